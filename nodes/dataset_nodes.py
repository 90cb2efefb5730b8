"""Dataset nodes: folder -> images (+ captions) -> latents + conditioning -> buckets -> disk and back.

Thin: each `execute` translates widgets into lora_core.data options and calls it; VAE / CLIP /
folder access goes through `comfy_glue`. kohya-ss repeats travel as the same tensor object
listed N times, so nothing is decoded, encoded or stored twice (see `lists.dedupe_by_identity`).
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..lora_core.data import (
    BucketSpec,
    CaptionOptions,
    FolderOptions,
    ImageLoadOptions,
    ResizeSpec,
    SampleInfo,
    SaveOptions,
    bucket_table,
    cover_crop,
    fit_to_bucket,
    group_latents_by_size,
    list_dataset_folders,
    load_image_folder,
    load_training_dataset,
    make_buckets,
    resolve_inside,
    save_dataset,
)
from ..lora_core.data.pairs import (CONTROL_RESIZE_MODES, EDIT_FAMILIES, MAX_CONTROLS, PairOptions, aspect_mismatch,
                                    as_one_size, edit_family, load_pair_folder, resize_control)
from ..lora_core.data.resize import RESIZE_MODES
from ..lora_core.errors import UserInputError
from . import comfy_glue as glue
from . import edit_glue
from .lists import conditioning_entry, dedupe_by_identity, single, training_samples
from .video_nodes import bucket_clips, encode_video_items, latent_shape_table

log = logging.getLogger(__name__)

CATEGORY = "LoRA Trainer/dataset"
PREFIX = "LoRATrainer_"


# ---- shared inputs ---------------------------------------------------------------------------

def _folder_inputs() -> list:
    return [
        io.Combo.Input(
            "folder", options=glue.input_subfolders(),
            tooltip="Subfolder of ComfyUI's input/ folder holding the training images (png, jpg, webp, bmp, "
                    "tiff). kohya-ss subfolders named N_concept (e.g. 10_dog) repeat their images N times. "
                    "Press R to refresh the list after adding a folder.",
        ),
        io.Boolean.Input(
            "recursive", default=False,
            tooltip="Also read images in every subfolder (off: the folder itself plus its N_concept subfolders).",
        ),
        io.Combo.Input(
            "resize", options=list(RESIZE_MODES), default="none",
            tooltip="none: keep sizes (mixed sizes train in per-size buckets); stretch: to width x height; "
                    "center_crop: cover and cut the centre; pad: fit inside and pad. longest_side > 0 keeps "
                    "each aspect ratio instead. Sizes snap to multiples of 8.",
        ),
        io.Int.Input("width", default=1024, min=0, max=16384, step=8,
                     tooltip="Target width in pixels for resize (0 = unused). Typical: 512 (SD1.5), 1024 (SDXL/Flux)."),
        io.Int.Input("height", default=1024, min=0, max=16384, step=8,
                     tooltip="Target height in pixels for resize (0 = unused)."),
        io.Int.Input("longest_side", default=0, min=0, max=16384, step=8, optional=True, advanced=True,
                     tooltip="If > 0, scale each image so its longest side is this many pixels, keeping its "
                             "aspect ratio (wins over width x height). 0 = off."),
        io.Combo.Input("alpha", options=["composite", "drop"], default="composite", optional=True, advanced=True,
                       tooltip="Transparent images: composite over white (what a viewer shows) or drop the alpha."),
        io.Boolean.Input("skip_bad_images", default=False, optional=True, advanced=True,
                         tooltip="Leave out unreadable / corrupt files (listed in the log) instead of stopping."),
    ]


def _folder_options(recursive, resize, width, height, longest_side, alpha, skip_bad_images,
                    captions: CaptionOptions | None, caption_extension: str = ".txt") -> FolderOptions:
    return FolderOptions(
        recursive=recursive,
        captions=captions,
        caption_extension=caption_extension,
        image=ImageLoadOptions(alpha=alpha),
        resize=ResizeSpec(mode=resize, width=width, height=height, longest_side=longest_side),
        skip_bad=skip_bad_images,
    )


def _caption_inputs() -> list:
    return [
        io.String.Input("trigger_word", default="",
                        tooltip="Prepended to every caption as 'trigger, caption' (empty = none). "
                                "Use a rare token such as 'sks person'."),
        io.String.Input("default_caption", default="",
                        tooltip="Caption for images without a .txt file (or with an empty one)."),
        io.Combo.Input("missing_captions", options=["use_default", "error"], default="use_default",
                       tooltip="use_default: images without a caption get default_caption; error: stop "
                               "and list the images that have no caption file."),
        io.String.Input("caption_extension", default=".txt", optional=True, advanced=True,
                        tooltip="Extension of caption files, e.g. .txt or .caption."),
    ]


def _repeated(items: list, repeats: list[int]) -> list:
    """Each item listed `repeats` times (the same object: no copy)."""
    return [item for item, count in zip(items, repeats) for _ in range(count)]


# ---- nodes -------------------------------------------------------------------------------------

class LoadImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadImageDataset",
            display_name="Load Image Dataset from Folder",
            category=CATEGORY,
            description="Load the images of an input/ subfolder as a list, in a fixed (natural-sort) order, "
                        "upright (EXIF), as RGB, optionally resized.",
            search_aliases=["load training images", "image folder"],
            inputs=_folder_inputs(),
            outputs=[io.Image.Output(display_name="images", is_output_list=True,
                                     tooltip="One image per file (kohya-ss repeats listed N times).")],
        )

    @classmethod
    def execute(cls, folder, recursive, resize, width, height, longest_side=0, alpha="composite",
                skip_bad_images=False) -> io.NodeOutput:
        options = _folder_options(recursive, resize, width, height, longest_side, alpha, skip_bad_images, None)
        dataset = load_image_folder(glue.input_directory(), folder, options)
        log.info("[LoRA Trainer] %s", dataset.summary())
        images = [image.unsqueeze(0) for image in dataset.images]
        return io.NodeOutput(_repeated(images, dataset.repeats))


class LoadImageTextDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadImageTextDataset",
            display_name="Load Image and Text Dataset from Folder",
            category=CATEGORY,
            description="Load images and their captions (name.txt beside name.png) from an input/ subfolder; "
                        "kohya-ss N_concept folders repeat their images N times without copies.",
            search_aliases=["load captions", "image caption folder", "kohya dataset"],
            inputs=_folder_inputs() + _caption_inputs(),
            outputs=[
                io.Image.Output(display_name="images", is_output_list=True,
                                tooltip="One image per file (kohya-ss repeats listed N times)."),
                io.String.Output(display_name="texts", is_output_list=True,
                                 tooltip="The caption of each image, same order."),
            ],
        )

    @classmethod
    def execute(cls, folder, recursive, resize, width, height, trigger_word, default_caption, missing_captions,
                longest_side=0, alpha="composite", skip_bad_images=False,
                caption_extension=".txt") -> io.NodeOutput:
        captions = CaptionOptions(trigger_word=trigger_word, default_caption=default_caption, missing=missing_captions)
        options = _folder_options(recursive, resize, width, height, longest_side, alpha, skip_bad_images, captions,
                                  caption_extension.strip())
        dataset = load_image_folder(glue.input_directory(), folder, options)
        log.info("[LoRA Trainer] %s", dataset.summary())
        images = [image.unsqueeze(0) for image in dataset.images]
        return io.NodeOutput(_repeated(images, dataset.repeats), _repeated(dataset.captions, dataset.repeats))


class LoadEditPairsDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadEditPairsDataset",
            display_name="Load Edit Pairs from Folder",
            category=CATEGORY,
            description="Load (control, target) image pairs for edit models (Flux.1 Kontext, Qwen-Image-Edit): "
                        "name.png is the target (the edited result) and name_control.png its control (the input), "
                        "or control/name.png in a control folder beside it; captions from name.txt.",
            search_aliases=["kontext dataset", "qwen image edit dataset", "image pairs", "before after"],
            inputs=_folder_inputs() + _caption_inputs() + [
                io.Int.Input("max_controls", default=1, min=1, max=MAX_CONTROLS,
                             tooltip="Control images per target the model takes: 1 for Flux.1 Kontext and "
                                     "Qwen-Image-Edit, up to 3 for Qwen-Image-Edit-2509 / 2511 (name_control_1.png, "
                                     "name_control_2.png, ... or control_1/, control_2/ folders). More is an error."),
                io.Float.Input("max_aspect_mismatch", default=1.25, min=0.0, max=16.0, step=0.05, optional=True,
                               advanced=True,
                               tooltip="A control whose aspect ratio differs from its target's by more than this "
                                       "factor stops the run (usually a wrong pairing). 0 = allow any shapes."),
            ],
            outputs=[
                io.Image.Output(display_name="images", is_output_list=True,
                                tooltip="The target images (what the edit produces), one per pair."),
                io.Image.Output(display_name="controls", is_output_list=True,
                                tooltip="The control image(s) of each target, same order: a batch of K images when "
                                        "a target has K controls."),
                io.String.Output(display_name="texts", is_output_list=True,
                                 tooltip="The caption (edit instruction) of each target, same order."),
            ],
        )

    @classmethod
    def execute(cls, folder, recursive, resize, width, height, trigger_word, default_caption, missing_captions,
                max_controls, longest_side=0, alpha="composite", skip_bad_images=False, caption_extension=".txt",
                max_aspect_mismatch=1.25) -> io.NodeOutput:
        captions = CaptionOptions(trigger_word=trigger_word, default_caption=default_caption, missing=missing_captions)
        options = _folder_options(recursive, resize, width, height, longest_side, alpha, skip_bad_images, captions,
                                  caption_extension.strip())
        dataset = load_pair_folder(
            glue.input_directory(), folder, recursive=options.recursive, captions=captions,
            caption_extension=options.caption_extension, image=options.image, resize=options.resize,
            pairs=PairOptions(max_controls=max_controls, max_aspect_mismatch=max_aspect_mismatch),
            skip_bad=skip_bad_images)
        log.info("[LoRA Trainer] %s", dataset.summary())
        images = [image.unsqueeze(0) for image in dataset.images]
        controls = [torch.stack(as_one_size(c, options.resize.pad_color)) for c in dataset.controls]
        return io.NodeOutput(_repeated(images, dataset.repeats), _repeated(controls, dataset.repeats),
                             _repeated(dataset.captions, dataset.repeats))


class MakeTrainingDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "MakeTrainingDataset",
            display_name="Make Training Dataset",
            category=CATEGORY,
            description="VAE-encode the images (batched when sizes match) and video clips (one at a time, each "
                        "decoded only then) and text-encode each distinct caption once. Outputs latents and "
                        "conditioning, index-aligned.",
            search_aliases=["encode dataset", "encode videos"],
            is_input_list=True,
            inputs=[
                io.Image.Input("images", optional=True,
                               tooltip="The training images (a list, e.g. from Load Image Dataset from Folder)."),
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (from your checkpoint loader)."),
                io.Clip.Input("clip", tooltip="The text encoder of the model you will train."),
                io.String.Input("texts", optional=True, force_input=True,
                                tooltip="Captions: one per image / clip (images first), or one for all; not "
                                        "connected = empty caption."),
                io.Image.Input("controls", optional=True,
                               tooltip="Edit pairs: the control image(s) of each image, same order (the 'controls' "
                                       "output of Load Edit Pairs from Folder). Each is VAE-encoded into its "
                                       "sample's own reference latents, as ReferenceLatent / TextEncodeQwenImageEdit "
                                       "do at inference."),
                io.Combo.Input("edit_model", options=list(EDIT_FAMILIES), default=next(iter(EDIT_FAMILIES)),
                               optional=True,
                               tooltip="With controls: the edit model you will train. Flux.1 Kontext: one control, "
                                       "encoded at the target's size. Qwen-Image-Edit: one control; -2509 / 2511: up "
                                       "to 3; the prompt is encoded with its controls (Qwen2.5-VL sees them) and the "
                                       "references at 1024x1024 pixels, as ComfyUI's Qwen edit nodes do."),
                io.Combo.Input("control_resize", options=list(CONTROL_RESIZE_MODES), default="family", optional=True,
                               advanced=True,
                               tooltip="Size of each control's reference latent. family: the edit model's rule "
                                       "(Kontext: match_target; Qwen: area_1024). match_target: the target's size; "
                                       "target_area: the target's pixel count at the control's aspect ratio; "
                                       "area_1024: 1024x1024 pixels at its aspect ratio; none: as loaded."),
                io.Video.Input("videos", optional=True,
                               tooltip="Video clips (Sample Video Clips or Resolution Bucket): each becomes one "
                                       "[1, C, T, H, W] latent of a video VAE."),
                io.Int.Input("vae_tile_size", default=0, min=0, max=4096, step=32, optional=True, advanced=True,
                             tooltip="Video clips: 0 = encode whole frames (in time chunks; ComfyUI retries in tiles "
                                     "if memory runs out); > 0 = encode in tiles of this many pixels from the start."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", is_output_list=True,
                                 tooltip="One latent per image or clip (raw VAE output; the trainer scales it)."),
                io.Conditioning.Output(display_name="conditioning", is_output_list=True,
                                       tooltip="One conditioning per latent, same order."),
            ],
        )

    @classmethod
    def execute(cls, images=None, vae=None, clip=None, texts=None, controls=None, edit_model=None,
                control_resize=None, videos=None, vae_tile_size=None) -> io.NodeOutput:
        # `images` first and optional (a video-only dataset has none); ComfyUI passes everything by name.
        vae, clip = single(vae), single(clip)
        if not images and not videos:
            raise UserInputError("Make Training Dataset has nothing to encode: connect images (Load Image Dataset "
                                 "from Folder) or videos (Sample Video Clips).")
        if controls:
            if not images:
                raise UserInputError("Edit pairs need their target images: connect the 'images' output of Load Edit "
                                     "Pairs from Folder too.")
            return _encode_pairs(list(images), list(controls), vae, clip, texts,
                                 edit_family(single(edit_model) or next(iter(EDIT_FAMILIES))),
                                 single(control_resize) or "family")
        # Split any image batches into single images (keeping repeated objects shared).
        distinct, index = dedupe_by_identity(list(images or []))
        singles_of = [list(batch.unbind(0)) if batch.shape[0] > 1 else [batch[0]] for batch in distinct]
        per_item = [singles_of[i] for i in index]
        sizes = [len(s) for s in per_item] + [1] * len(videos or [])
        count = sum(sizes)
        texts = list(texts) if texts else [""]
        if len(texts) == 1:
            texts = texts * count
        elif len(texts) == len(sizes) and len(sizes) != count:
            texts = [t for t, n in zip(texts, sizes) for _ in range(n)]
        if len(texts) != count:
            raise UserInputError(
                f"{len(texts)} captions for {count} images / clips: connect one caption per image or clip (the "
                f"'texts' output of the dataset loader or Sample Video Clips) or a single caption for all."
            )

        flat_distinct = [image for batch in singles_of for image in batch]
        latents = glue.encode_images(vae, flat_distinct) if flat_distinct else []
        latent_dicts = [{"samples": latent} for latent in latents]
        position = {}
        offset = 0
        for d, batch in enumerate(singles_of):
            position[d] = offset
            offset += len(batch)
        out_latents = []
        for i, item in zip(index, per_item):
            out_latents.extend(latent_dicts[position[i] + j] for j in range(len(item)))
        clip_count = 0
        if videos:
            clip_latents, clip_count = encode_video_items(vae, list(videos), single(vae_tile_size) or 0)
            # Clips that failed to decode under skip_bad_files are left out together with their captions.
            kept = [len(out_latents) + i for i, latent in enumerate(clip_latents) if latent is not None]
            texts = texts[:len(out_latents)] + [texts[i] for i in kept]
            out_latents.extend(latent for latent in clip_latents if latent is not None)
            if not out_latents:
                raise UserInputError("No clip could be decoded (see the log): re-export the videos.")
        conditioning = glue.encode_texts(clip, texts)
        log.info("[LoRA Trainer] encoded %d images (%d distinct), %d clips (%d distinct), %d distinct captions",
                 count - len(videos or []), len(flat_distinct), len(videos or []), clip_count, len(set(texts)))
        return io.NodeOutput(out_latents, conditioning)


def _encode_pairs(images: list, controls: list, vae, clip, texts, family, control_resize: str) -> io.NodeOutput:
    """Targets -> latents; each target's controls -> reference latents in its own conditioning.

    kohya-ss repeats arrive as the same objects listed N times: each distinct pair is encoded once
    and its latent and conditioning objects are listed N times again.
    """
    if len(controls) != len(images):
        raise UserInputError(
            f"{len(images)} images but {len(controls)} control items: connect the 'images' and 'controls' outputs "
            f"of the same Load Edit Pairs from Folder node (one control item per image).")
    distinct, index = dedupe_by_identity(images)
    first = {}
    for position, d in enumerate(index):
        first.setdefault(d, position)
    pair_controls = [controls[first[d]] for d in range(len(distinct))]
    for d, (target, control) in enumerate(zip(distinct, pair_controls)):
        if target.shape[0] != 1:
            raise UserInputError(
                f"Image item {first[d]} is a batch of {target.shape[0]} images: with controls, give one image per "
                f"item (as Load Edit Pairs from Folder does), so each image has its own controls.")
        if control.shape[0] > family.max_controls:
            hint = "pick the edit_model you train (Qwen-Image-Edit-2509 / 2511 takes up to 3) or " \
                if family.max_controls < 3 else ""
            raise UserInputError(
                f"Image {first[d]} has {control.shape[0]} control images, but {family.label} takes "
                f"{family.max_controls}: {hint}give fewer controls (max_controls in Load Edit Pairs from Folder).")
        if control.shape[0] == 0:
            raise UserInputError(f"Image {first[d]} has an empty control batch: every image needs a control image.")
    count = len(images)
    texts = list(texts) if texts else [""]
    if len(texts) == 1:
        texts = texts * count
    if len(texts) != count:
        raise UserInputError(f"{len(texts)} captions for {count} images: connect one caption per image (the 'texts' "
                             f"output of Load Edit Pairs from Folder) or a single caption for all.")
    pair_texts = [texts[first[d]] for d in range(len(distinct))]
    edit_glue.check_text_encoder(clip, family)
    mode = family.control_resize if control_resize == "family" else control_resize

    targets = [t[0] for t in distinct]
    sized = []                                   # per pair: its controls at the size the model sees
    for target, control in zip(targets, pair_controls):
        target_wh = (target.shape[1], target.shape[0])
        sized.append([resize_control(c, mode, target_wh) for c in control.unbind(0)])
    flat = [c for cs in sized for c in cs]
    encoded = glue.encode_images(vae, targets + flat)
    target_latents, control_latents = encoded[:len(targets)], encoded[len(targets):]

    conds, offset = [], 0
    plain = glue.encode_texts(clip, pair_texts) if family.text_encoding == "plain" else None
    for d, control in enumerate(pair_controls):
        refs = control_latents[offset:offset + len(sized[d])]
        offset += len(sized[d])
        text_cond = plain[d] if plain is not None else edit_glue.encode_edit_text(
            clip, pair_texts[d], list(control.unbind(0)), family)
        conds.append(edit_glue.with_reference_latents(text_cond, refs, family))
    latent_dicts = [{"samples": latent} for latent in target_latents]
    log.info("[LoRA Trainer] encoded %d edit pairs (%d distinct) for %s, controls %s", count, len(distinct),
             family.label, mode)
    return io.NodeOutput([latent_dicts[d] for d in index], [conds[d] for d in index])


class ResolutionBucket(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "ResolutionBucket",
            display_name="Resolution Bucket",
            category=CATEGORY,
            description="Images or video clips in: scale and centre-crop each to the area-preserving bucket nearest "
                        "its aspect ratio (clips lazily, frames are cropped as they are decoded). Latents + "
                        "conditioning in: group them into one batch per size (frames x height x width for video). "
                        "Shows the bucket table.",
            search_aliases=["bucket by resolution", "aspect ratio buckets"],
            is_input_list=True,
            inputs=[
                io.Image.Input("images", optional=True,
                               tooltip="Images to fit into buckets before Make Training Dataset (optional)."),
                io.Image.Input("controls", optional=True,
                               tooltip="Edit pairs: the control images of the images, same order; each goes to its "
                                       "target's bucket (its own nearest one if its shape differs a lot)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Latents to group by size (optional; connect conditioning too)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The conditioning that belongs to the latents, same order."),
                io.Int.Input("resolution", default=1024, min=64, max=8192, step=64,
                             tooltip="Buckets hold about resolution x resolution pixels. 512 for SD1.5, "
                                     "1024 for SDXL / Flux."),
                io.Int.Input("step", default=64, min=8, max=512, step=8, optional=True, advanced=True,
                             tooltip="Bucket sides are multiples of this many pixels (64 is usual)."),
                io.Float.Input("max_aspect", default=2.0, min=1.0, max=8.0, step=0.1, optional=True, advanced=True,
                               tooltip="Longest side / shortest side of a bucket at most this (2.0 is usual)."),
                io.Video.Input("videos", optional=True,
                               tooltip="Video clips to fit into buckets before Make Training Dataset (optional; "
                                       "e.g. from Sample Video Clips). Wan 480p: resolution 640 (832x480 bucket)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", is_output_list=True,
                                 tooltip="One batched latent per size bucket."),
                io.Conditioning.Output(display_name="conditioning", is_output_list=True,
                                       tooltip="One conditioning list per bucket, same order as its samples."),
                io.Image.Output(display_name="images", is_output_list=True,
                                tooltip="The images, each cropped to its bucket."),
                io.String.Output(display_name="bucket_table", tooltip="The bucket table as text."),
                io.Image.Output(display_name="controls", is_output_list=True,
                                tooltip="The controls of each image, cropped to its bucket, same order as images."),
                io.Video.Output(display_name="videos", is_output_list=True,
                                tooltip="The video clips, each set to be cropped to its bucket (frames x w x h table)."),
            ],
        )

    @classmethod
    def execute(cls, resolution, step=64, max_aspect=2.0, images=None, latents=None, conditioning=None,
                controls=None, videos=None) -> io.NodeOutput:
        resolution, step, max_aspect = single(resolution), single(step), single(max_aspect)
        if images is None and latents is None and videos is None:
            raise UserInputError("Resolution Bucket has nothing to do: connect images or videos (to crop into "
                                 "buckets) or latents and conditioning (to group by size).")
        if (latents is None) != (conditioning is None):
            raise UserInputError("Resolution Bucket needs latents and conditioning together: connect both "
                                 "outputs of Make Training Dataset (or Load Training Dataset).")
        if controls is not None and (images is None or len(controls) != len(images)):
            raise UserInputError("Resolution Bucket: connect controls together with their images (the 'images' and "
                                 "'controls' outputs of Load Edit Pairs from Folder), one control item per image.")
        tables = []
        out_images, out_controls = [], []
        if images is not None:
            buckets = make_buckets(BucketSpec(resolution=resolution, step=step, max_aspect=max_aspect))
            distinct, index = dedupe_by_identity(list(images))
            fitted = [_fit_batch(batch, buckets) for batch in distinct]
            out_images = [fitted[i] for i in index]
            if controls is not None:
                first = {}
                for position, d in enumerate(index):
                    first.setdefault(d, position)
                fitted_controls = [_fit_controls(controls[first[d]], fitted[d], buckets) for d in range(len(distinct))]
                out_controls = [fitted_controls[i] for i in index]
            tables.append("images:\n" + bucket_table([(im.shape[2], im.shape[1]) for im in out_images]))
        out_videos = []
        if videos is not None:
            out_videos, video_table = bucket_clips(list(videos), make_buckets(
                BucketSpec(resolution=resolution, step=step, max_aspect=max_aspect)))
            tables.append("video clips:\n" + video_table)
        out_latents, out_conds = [], []
        if latents is not None:
            flat_latents, flat_conds = training_samples(latents, conditioning)
            if len(flat_conds) == 1 and len(flat_latents) > 1:
                flat_conds = flat_conds * len(flat_latents)
            for bucket in group_latents_by_size(flat_latents, flat_conds):
                out_latents.append({"samples": bucket.samples})
                out_conds.append([conditioning_entry(c) for c in bucket.conds])
            if any(s["samples"].ndim == 5 for s in out_latents):
                tables.append("latents (latent frames x height x width):\n" + latent_shape_table(out_latents))
            else:
                sizes = [(s["samples"].shape[-1], s["samples"].shape[-2]) for s in out_latents
                         for _ in range(s["samples"].shape[0])]
                tables.append("latents (sizes in latent cells; x8 = pixels for SD / SDXL / Flux VAEs):\n"
                              + bucket_table(sizes))
        table = "\n".join(tables)
        log.info("[LoRA Trainer] resolution buckets\n%s", table)
        return io.NodeOutput(out_latents, out_conds, out_images, table, out_controls, out_videos, ui=ui.PreviewText(table))


def _fit_controls(controls: torch.Tensor, target: torch.Tensor, buckets: list) -> torch.Tensor:
    """A target's controls [K, H, W, 3] in its bucket: the target's exact size when the shapes are alike
    (the pair stays pixel-aligned), else each in the bucket nearest its own shape."""
    width, height = target.shape[2], target.shape[1]
    fitted = []
    for control in controls.unbind(0):
        if aspect_mismatch(control, target[0]) <= 1.25:
            fitted.append(cover_crop(control, width, height))
        else:
            fitted.append(fit_to_bucket(control, buckets))
    return torch.stack(as_one_size(fitted))


def _fit_batch(batch: torch.Tensor, buckets: list) -> torch.Tensor:
    """An IMAGE batch with each image cropped to its bucket; the batch must fall into one bucket."""
    fitted = [fit_to_bucket(image, buckets) for image in batch.unbind(0)]
    if len({tuple(f.shape) for f in fitted}) > 1:
        raise UserInputError(
            "An image batch holds images of different aspect ratios: feed Resolution Bucket a list of single "
            "images (e.g. from Load Image Dataset from Folder), not one batch."
        )
    return torch.stack(fitted)


class SaveTrainingDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "SaveTrainingDataset",
            display_name="Save Training Dataset",
            category=CATEGORY,
            description="Write latents + conditioning to a dataset folder (safetensors shards + manifest.json, no "
                        "pickle) under ComfyUI's datasets folder, so later runs skip encoding.",
            search_aliases=["export dataset", "cache latents"],
            is_input_list=True,
            is_output_node=True,
            inputs=[
                io.Latent.Input("latents", tooltip="Latents from Make Training Dataset (or Resolution Bucket)."),
                io.Conditioning.Input("conditioning", tooltip="The conditioning that belongs to the latents."),
                io.String.Input("folder_name", default="my_dataset",
                                tooltip="Folder inside ComfyUI's datasets/ folder; subfolders like 'project/run1' "
                                        "are allowed."),
                io.String.Input("texts", optional=True, force_input=True,
                                tooltip="Optional captions (one per latent) recorded in the manifest."),
                io.Boolean.Input("overwrite", default=False, optional=True, advanced=True,
                                 tooltip="Replace an existing dataset of that name (only a folder that holds a "
                                         "saved dataset is ever replaced)."),
                io.Int.Input("shard_size_mb", default=256, min=1, max=16384, optional=True, advanced=True,
                             tooltip="Largest shard file size in MB (256 is fine)."),
                io.String.Input("vae_name", default="", optional=True, advanced=True,
                                tooltip="Which VAE made the latents, recorded in the manifest (free text)."),
                io.String.Input("text_encoder_name", default="", optional=True, advanced=True,
                                tooltip="Which text encoder made the conditioning, recorded in the manifest."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The dataset folder name, for Load Training Dataset.")],
        )

    @classmethod
    def execute(cls, latents, conditioning, folder_name, texts=None, overwrite=False, shard_size_mb=256,
                vae_name="", text_encoder_name="") -> io.NodeOutput:
        name = single(folder_name)
        if len(conditioning) == 1 and len(latents) > 1:
            conditioning = list(conditioning) * len(latents)
        if len(latents) != len(conditioning):
            raise UserInputError(
                f"{len(latents)} latents but {len(conditioning)} conditionings: connect both outputs of the same "
                f"Make Training Dataset node."
            )
        # kohya-ss repeats arrive as the same (latent, conditioning) objects listed N times in a row:
        # store each once with its repeat count.
        pairs = list(zip(latents, conditioning))
        captions = list(texts) if texts else None
        if captions is not None and len(captions) not in (1, len(pairs)):
            raise UserInputError(f"{len(captions)} texts for {len(pairs)} latents: connect one caption per latent.")
        kept, repeats, kept_captions = [], [], []
        for i, (latent, cond) in enumerate(pairs):
            if kept and kept[-1][0] is latent and kept[-1][1] is cond:
                repeats[-1] += 1
                continue
            kept.append((latent, cond))
            repeats.append(1)
            kept_captions.append(captions[i if len(captions) > 1 else 0] if captions else "")
        flat_latents, flat_conds = training_samples([l for l, _ in kept], [c for _, c in kept])
        per_sample_repeats = _expand_counts([l for l, _ in kept], repeats)
        per_sample_captions = _expand_counts([l for l, _ in kept], kept_captions)
        per_sample_frames = _expand_counts([l for l, _ in kept], [_frame_count(l) for l, _ in kept])
        info = [SampleInfo(caption=c, repeats=r, frames=f)
                for c, r, f in zip(per_sample_captions, per_sample_repeats, per_sample_frames)]
        options = SaveOptions(vae=single(vae_name), text_encoder=single(text_encoder_name),
                              shard_max_bytes=single(shard_size_mb) * 1024 * 1024, overwrite=single(overwrite))
        root = glue.dataset_roots()[0]
        folder = save_dataset(root, name, flat_latents, flat_conds, info, options)
        message = f"Saved {len(flat_latents)} samples to {folder}"
        log.info("[LoRA Trainer] %s", message)
        return io.NodeOutput(name, ui=ui.PreviewText(message))


def _frame_count(latent) -> int:
    """Pixel frames of a video clip's LATENT (set by Make Training Dataset), 0 when unknown."""
    return int(latent.get("frame_count", 0) or 0) if isinstance(latent, dict) else 0


def _expand_counts(latent_dicts: list, values: list) -> list:
    """One value per sample: a LATENT dict of batch B gives its value to each of its B samples."""
    out = []
    for latent, value in zip(latent_dicts, values):
        samples = latent["samples"] if isinstance(latent, dict) else latent
        out.extend([value] * (samples.shape[0] if samples.ndim >= 4 else 1))
    return out


class LoadTrainingDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = [name for root in glue.dataset_roots() for name in list_dataset_folders(root)]
        return io.Schema(
            node_id=PREFIX + "LoadTrainingDataset",
            display_name="Load Training Dataset",
            category=CATEGORY,
            description="Read a dataset folder written by Save Training Dataset (or by ComfyUI's built-in one).",
            search_aliases=["import dataset", "cached latents"],
            inputs=[
                io.Combo.Input("folder_name", options=sorted(set(names)),
                               tooltip="A dataset under ComfyUI's datasets/ folder. Press R to refresh the list."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", is_output_list=True, tooltip="One latent per sample."),
                io.Conditioning.Output(display_name="conditioning", is_output_list=True,
                                       tooltip="One conditioning per sample, same order."),
                io.String.Output(display_name="texts", is_output_list=True,
                                 tooltip="The recorded caption of each sample (empty when none was saved)."),
            ],
        )

    @classmethod
    def execute(cls, folder_name) -> io.NodeOutput:
        root = _root_holding(folder_name)
        samples = load_training_dataset(root, folder_name)
        latents, conds = samples.to_comfy()
        for latent, info in zip(latents, samples.info or []):
            if info.frames:
                latent["frame_count"] = info.frames
        repeats = [max(1, int(i.repeats)) for i in samples.info] if samples.info else [1] * len(latents)
        captions = [i.caption for i in samples.info] if samples.info else [""] * len(latents)
        log.info("[LoRA Trainer] loaded %d samples from %s", len(latents), folder_name)
        return io.NodeOutput(_repeated(latents, repeats), _repeated(conds, repeats), _repeated(captions, repeats))


def _root_holding(name: str):
    for root in glue.dataset_roots():
        if resolve_inside(root, name, "dataset folder").is_dir():
            return root
    raise UserInputError(
        f"The dataset {name!r} was not found in {', '.join(map(str, glue.dataset_roots()))}: save one with Save "
        f"Training Dataset first, or press R to refresh the list."
    )


NODES = [LoadImageDataset, LoadImageTextDataset, LoadEditPairsDataset, MakeTrainingDataset, ResolutionBucket,
         SaveTrainingDataset, LoadTrainingDataset]
