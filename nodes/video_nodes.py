"""Video dataset nodes: a folder of videos (+ captions) -> lazy VIDEO clips the VAE accepts.

Thin like the image nodes: widgets become lora_core options (video_folder, clips); ComfyUI's VIDEO
type comes from video_glue. Nothing is decoded here: loaders probe files, Sample Video Clips plans
frame indices; Make Training Dataset decodes each clip's frames when it encodes that clip.
kohya-ss repeats travel as the same VIDEO object listed N times (encoded once, see lists.dedupe_by_identity).
"""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..lora_core.data.captions import CaptionOptions
from ..lora_core.data.clips import EXTRACTIONS, TOO_SHORT_POLICIES, ClipOptions, FrameRule, clip_table, plan_clips
from ..lora_core.data.video import DEFAULT_MAX_PIXELS
from ..lora_core.data.video_folder import VideoFolderOptions, load_video_folder
from ..lora_core.errors import UserInputError
from . import comfy_glue as glue
from . import video_glue
from .lists import dedupe_by_identity, single

log = logging.getLogger(__name__)

CATEGORY = "LoRA Trainer/dataset"
PREFIX = "LoRATrainer_"
FRAME_RULES = {"from_vae": None, "4k+1 (Wan, HunyuanVideo)": 4, "8k+1 (LTX)": 8, "any": 1}


def _folder_inputs() -> list:
    return [
        io.Combo.Input(
            "folder", options=glue.input_subfolders(),
            tooltip="Subfolder of ComfyUI's input/ folder holding the training videos (mp4, webm, mov, mkv, avi, "
                    "gif). kohya-ss subfolders named N_concept (e.g. 10_dance) repeat their videos N times. "
                    "Press R to refresh the list after adding a folder.",
        ),
        io.Boolean.Input("recursive", default=False,
                         tooltip="Also read every subfolder (off: the folder itself plus its N_concept subfolders)."),
        io.Boolean.Input("include_images", default=True,
                         tooltip="Also use still images (png, jpg, webp...) in the folder, as one-frame clips: "
                                 "images and videos train together."),
        io.Boolean.Input("skip_bad_files", default=False, optional=True, advanced=True,
                         tooltip="Leave out files that cannot be read (corrupt, empty, audio-only; listed in the "
                                 "log) instead of stopping."),
        io.Float.Input("max_megapixels", default=round(DEFAULT_MAX_PIXELS / 1e6, 1), min=0.1, max=1000.0, step=0.1,
                       optional=True, advanced=True,
                       tooltip="Refuse videos whose frames are larger than this (16.8 MP: 4K fits, 8K does not)."),
    ]


def _folder_options(recursive, include_images, skip_bad_files, max_megapixels, captions=None,
                    caption_extension=".txt") -> VideoFolderOptions:
    return VideoFolderOptions(recursive=recursive, include_images=include_images, captions=captions,
                              caption_extension=caption_extension, skip_bad=skip_bad_files,
                              max_pixels=int(max_megapixels * 1e6))


def _load(folder, options: VideoFolderOptions):
    loaded = load_video_folder(glue.input_directory(), folder, options)
    log.info("[LoRA Trainer] %s", loaded.summary())
    videos = [video_glue.ClipVideo(clip) for clip in loaded.clips]
    return loaded, [v for v, n in zip(videos, loaded.repeats) for _ in range(n)]


class LoadVideoDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadVideoDataset",
            display_name="Load Video Dataset from Folder",
            category=CATEGORY,
            description="List the videos of an input/ subfolder in natural order, as lazy VIDEO values: files are "
                        "checked now, frames are decoded only for the clips that get trained.",
            search_aliases=["load training videos", "video folder"],
            inputs=_folder_inputs(),
            outputs=[io.Video.Output(display_name="videos", is_output_list=True,
                                     tooltip="One VIDEO per file (kohya-ss repeats listed N times).")],
        )

    @classmethod
    def execute(cls, folder, recursive, include_images, skip_bad_files=False,
                max_megapixels=DEFAULT_MAX_PIXELS / 1e6) -> io.NodeOutput:
        _, videos = _load(folder, _folder_options(recursive, include_images, skip_bad_files, max_megapixels))
        return io.NodeOutput(videos)


class LoadVideoTextDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadVideoTextDataset",
            display_name="Load Video and Text Dataset from Folder",
            category=CATEGORY,
            description="Videos and their captions (name.txt beside name.mp4) from an input/ subfolder, as lazy VIDEO "
                        "values; kohya-ss N_concept folders repeat their videos N times without copies.",
            search_aliases=["load video captions", "video caption folder", "kohya video dataset"],
            inputs=_folder_inputs() + [
                io.String.Input("trigger_word", default="",
                                tooltip="Prepended to every caption as 'trigger, caption' (empty = none)."),
                io.String.Input("default_caption", default="",
                                tooltip="Caption for videos without a .txt file (or with an empty one)."),
                io.Combo.Input("missing_captions", options=["use_default", "error"], default="use_default",
                               tooltip="use_default: videos without a caption get default_caption; error: stop and "
                                       "list the videos that have no caption file."),
                io.String.Input("caption_extension", default=".txt", optional=True, advanced=True,
                                tooltip="Extension of caption files, e.g. .txt or .caption."),
            ],
            outputs=[
                io.Video.Output(display_name="videos", is_output_list=True,
                                tooltip="One VIDEO per file (kohya-ss repeats listed N times)."),
                io.String.Output(display_name="texts", is_output_list=True,
                                 tooltip="The caption of each video, same order."),
            ],
        )

    @classmethod
    def execute(cls, folder, recursive, include_images, trigger_word, default_caption, missing_captions,
                skip_bad_files=False, max_megapixels=DEFAULT_MAX_PIXELS / 1e6,
                caption_extension=".txt") -> io.NodeOutput:
        captions = CaptionOptions(trigger_word=trigger_word, default_caption=default_caption, missing=missing_captions)
        options = _folder_options(recursive, include_images, skip_bad_files, max_megapixels, captions,
                                  caption_extension.strip())
        loaded, videos = _load(folder, options)
        texts = [t for t, n in zip(loaded.captions, loaded.repeats) for _ in range(n)]
        return io.NodeOutput(videos, texts)


class SampleVideoClips(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "SampleVideoClips",
            display_name="Sample Video Clips",
            category=CATEGORY,
            description="Cut training clips out of videos: a frame count the VAE accepts (4k+1 for Wan, 8k+1 for "
                        "LTX, read from the VAE), at a target frame rate, from the head, evenly spread, in chunks, "
                        "sliding or at seeded random starts. Only frame indices are chosen here; nothing is decoded.",
            search_aliases=["video clips", "frame sampling", "temporal crop"],
            is_input_list=True,
            inputs=[
                io.Video.Input("videos", tooltip="Videos (e.g. from Load Video and Text Dataset from Folder)."),
                io.String.Input("texts", optional=True, force_input=True,
                                tooltip="Their captions (one per video); each clip gets its video's caption."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The video model's VAE: frame counts are snapped to what it accepts."),
                io.Int.Input("frames", default=33, min=1, max=1025,
                             tooltip="Frames per clip, snapped down to the VAE's rule (Wan: 17, 33, 49, 81...). "
                                     "More frames cost memory roughly in proportion."),
                io.Combo.Input("frame_rule", options=list(FRAME_RULES), default="from_vae",
                               tooltip="Which frame counts the VAE takes: read from the connected VAE, or set here."),
                io.Combo.Input("extraction", options=list(EXTRACTIONS), default="head",
                               tooltip="head: the first clip; uniform: clips_per_video clips spread evenly; chunk: "
                                       "back-to-back clips; slide: overlapping clips every slide_step frames; random: "
                                       "clips_per_video clips at seeded random starts; full: the whole video (up to "
                                       "frames)."),
                io.Float.Input("target_fps", default=16.0, min=0.0, max=240.0, step=0.5,
                               tooltip="Resample to this frame rate first (Wan: 16, HunyuanVideo: 24, LTX: 24). 0 = "
                                       "keep the source rate (then frame_stride applies). Variable-rate videos are "
                                       "sampled by timestamps."),
                io.Int.Input("clips_per_video", default=1, min=0, max=1000,
                             tooltip="uniform / random: clips per video; chunk / slide: at most this many (0 = all)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds the random extraction: the same seed picks the same clips."),
                io.Combo.Input("too_short", options=list(TOO_SHORT_POLICIES), default="error",
                               tooltip="A video with fewer frames than a clip: error (stop, naming it), skip it, or "
                                       "use a shorter clip (its longest length the VAE accepts)."),
                io.Int.Input("frame_stride", default=1, min=1, max=1000, optional=True, advanced=True,
                             tooltip="With target_fps 0: take every n-th frame."),
                io.Int.Input("slide_step", default=0, min=0, max=100000, optional=True, advanced=True,
                             tooltip="slide: frames between clip starts (0 = half a clip)."),
            ],
            outputs=[
                io.Video.Output(display_name="clips", is_output_list=True,
                                tooltip="One lazy VIDEO per clip (connects to Make Training Dataset, Resolution "
                                        "Bucket, or core video nodes)."),
                io.String.Output(display_name="texts", is_output_list=True,
                                 tooltip="The caption of each clip, same order."),
                io.String.Output(display_name="clip_table", tooltip="Frames x width x height of the clips."),
            ],
        )

    @classmethod
    def execute(cls, videos, frames, frame_rule, extraction, target_fps, clips_per_video, seed, too_short,
                texts=None, vae=None, frame_stride=None, slide_step=None) -> io.NodeOutput:
        rule = _rule(single(frame_rule), single(vae), single(frames))
        options = ClipOptions(frames=single(frames), extraction=single(extraction), target_fps=single(target_fps),
                              frame_stride=single(frame_stride) or 1, clips_per_video=single(clips_per_video),
                              slide_step=single(slide_step) or 0, seed=single(seed), too_short=single(too_short),
                              rule=rule)
        videos = list(videos)
        texts = _texts_for(videos, texts)
        distinct, index = dedupe_by_identity(videos)
        sources = [video_glue.as_clip(v, i) for i, v in enumerate(distinct)]
        per_distinct, skipped = [], []
        for position, source in enumerate(sources):
            clips, reason = plan_clips(source, options, key=f"{position}:{source.source.shown}")
            per_distinct.append([video_glue.ClipVideo(c) for c in clips])
            if reason:
                skipped.append(reason)
        out_clips, out_texts = [], []
        for d, text in zip(index, texts):
            out_clips.extend(per_distinct[d])
            out_texts.extend([text] * len(per_distinct[d]))
        if not out_clips:
            raise UserInputError(f"No clips: every video is shorter than a clip ({'; '.join(skipped[:3])}). Lower "
                                 f"frames or target_fps, or set too_short to 'shorter_clip'.")
        table = clip_table([c.clip for c in out_clips])
        if options.clip_frames != options.frames:
            table = f"frames {options.frames} snapped to {options.clip_frames} ({rule.describe()})\n" + table
        if skipped:
            table += f"\nskipped {len(skipped)} videos shorter than a clip:\n" + "\n".join(f"  {s}" for s in skipped)
        log.info("[LoRA Trainer] video clips\n%s", table)
        return io.NodeOutput(out_clips, out_texts, table, ui=ui.PreviewText(table))


def _rule(label: str, vae, frames: int) -> FrameRule:
    step = FRAME_RULES.get(label, "unknown")
    if step == "unknown":
        raise UserInputError(f"frame_rule {label!r} is not an option: use one of {', '.join(FRAME_RULES)}.")
    if step is not None:
        return FrameRule(step)
    if vae is None:
        raise UserInputError("frame_rule is 'from_vae' but no VAE is connected: connect the video model's VAE, or "
                             "pick the rule by hand (4k+1 for Wan / HunyuanVideo, 8k+1 for LTX).")
    rule = video_glue.frame_rule(vae)
    if rule is None and frames == 1:
        return FrameRule(1)
    if rule is None:
        raise UserInputError("The connected VAE is an image VAE: it encodes single frames only. Connect the video "
                             "model's VAE (e.g. Wan 2.1 VAE), or set frames to 1.")
    return rule


def _texts_for(videos: list, texts) -> list[str]:
    texts = list(texts) if texts else [""]
    if len(texts) == 1:
        return texts * len(videos)
    if len(texts) != len(videos):
        raise UserInputError(f"{len(texts)} captions for {len(videos)} videos: connect the 'texts' output of the same "
                             f"Load Video and Text Dataset from Folder node, or a single caption.")
    return texts


# ---- helpers for Make Training Dataset and Resolution Bucket ----------------------------------

def encode_video_items(vae, videos: list, tile_size: int = 0) -> tuple[list[dict | None], int]:
    """(one LATENT dict per VIDEO item, number of distinct clips): each distinct clip decoded and encoded once.

    The dict carries "frame_count" (pixel frames of the clip) so Save Training Dataset records it. None
    marks a clip left out because it could not be decoded and its loader skips unreadable files.
    """
    distinct, index = dedupe_by_identity(videos)
    clips = [video_glue.as_clip(v, i) for i, v in enumerate(distinct)]
    latents = video_glue.encode_clips(vae, clips, tile_size)
    dicts = [None if latent is None else {"samples": latent, "frame_count": clip.frame_count}
             for latent, clip in zip(latents, clips)]
    return [dicts[i] for i in index], len(clips)


def bucket_clips(videos: list, buckets: list[tuple[int, int]]) -> tuple[list, str]:
    """Each clip set to cover-crop into its nearest area-preserving bucket (lazily), and the table
    of (frames, width, height) groups."""
    from ..lora_core.data.buckets import nearest_bucket

    distinct, index = dedupe_by_identity(list(videos))
    fitted = []
    for position, video in enumerate(distinct):
        clip = video_glue.as_clip(video, position)
        fitted.append(video_glue.ClipVideo(clip.with_size(*nearest_bucket(clip.width, clip.height,
                                                                          buckets))))
    out = [fitted[i] for i in index]
    return out, clip_table([v.clip for v in out])


def latent_shape_table(latents: list) -> str:
    """Samples per latent shape, frames shown for video latents (what bucket_mode batches together)."""
    counts: dict[tuple, int] = {}
    for latent in latents:
        samples = latent["samples"]
        for _ in range(samples.shape[0]):
            shape = tuple(samples.shape[2:])
            counts[shape] = counts.get(shape, 0) + 1
    lines = ["latent (frames x) h x w   samples"]
    for shape, n in sorted(counts.items()):
        lines.append(f"{' x '.join(str(s) for s in shape):>22}   {n:>7}")
    lines.append(f"{len(counts)} buckets, {sum(counts.values())} samples")
    return "\n".join(lines)


NODES = [LoadVideoDataset, LoadVideoTextDataset, SampleVideoClips]
