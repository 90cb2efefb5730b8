"""Write example_workflows/*.json (UI format) from the node definitions a live server publishes.

    COMFYUI_ROOT=/path/to/ComfyUI python tests/integration/build_examples.py          # write
    COMFYUI_ROOT=/path/to/ComfyUI python tests/integration/build_examples.py --check  # compare only
    python tests/integration/build_examples.py --url http://127.0.0.1:8188             # a running server

Each example is described below as a graph; ui_graph lays widget values out in the order the
node expects, so the files stay right when a node gains an input: rebuild, and the test
`test_examples_match_the_node_definitions` fails until the files are rebuilt.
The examples assume SD1.5 (512 px) except lora_08 (Wan 2.1 video); the user picks a checkpoint and puts images in
input/lora_training (captions as name.txt beside each image where the example reads them).
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ui_graph import Graph  # noqa: E402

EXAMPLES_DIR = HERE.parent.parent / "example_workflows"
P = "LoRATrainer_"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
FOLDER = "lora_training"
CAPTION = "a photo of sks toy"
RESOLUTION = 512
STEPS = 200

X0, X1, X2, X3, X4 = 0, 420, 840, 1260, 1680


def _note(g: Graph, text: str, width=820, height=230):
    g.note(text.strip(), (X0, -height - 40), size=(width, height))


def _checkpoint(g: Graph, pos=(X0, 0)):
    return g.add("CheckpointLoaderSimple", pos, ckpt_name=CHECKPOINT)


def _images(g: Graph, pos, **widgets):
    return g.add(P + "LoadImageDataset", pos, folder=FOLDER, resize="center_crop", width=RESOLUTION,
                 height=RESOLUTION, **widgets)


def _captioned_images(g: Graph, pos, **widgets):
    return g.add(P + "LoadImageTextDataset", pos, folder=FOLDER, resize="center_crop", width=RESOLUTION,
                 height=RESOLUTION, trigger_word="sks toy", default_caption=CAPTION, **widgets)


def _caption(g: Graph, pos, text=CAPTION):
    return g.add("PrimitiveStringMultiline", pos, title="Caption for every image", value=text)


def _make_dataset(g: Graph, pos, images, checkpoint, texts):
    node = g.add(P + "MakeTrainingDataset", pos)
    g.connect(images.out("images"), node, "images")
    g.connect(checkpoint.out("VAE"), node, "vae")
    g.connect(checkpoint.out("CLIP"), node, "clip")
    g.connect(texts, node, "texts")
    return node


def _train(g: Graph, pos, model, latents, positive, **widgets):
    node = g.add(P + "TrainLoRA", pos, **{"steps": STEPS, **widgets})
    g.connect(model, node, "model")
    g.connect(latents, node, "latents")
    g.connect(positive, node, "positive")
    return node


def _save_and_plot(g: Graph, train, prefix, pos=(X3, 0)):
    save = g.add(P + "SaveLoRAWeights", pos, prefix=prefix)
    g.connect(train.out("lora"), save, "lora")
    g.connect(train.out("steps"), save, "steps")
    plot = g.add(P + "PlotLossGraph", (pos[0], pos[1] + 260), filename_prefix=f"{prefix}_loss")
    g.connect(train.out("loss_map"), plot, "loss")
    return save, plot


def _sample_prompt(g: Graph, train, checkpoint, pos, prefix, every=STEPS // 4, text=f"{CAPTION} on a table"):
    """A sample prompt for Train LoRA (every ~1/4 of the steps) and its grid saved beside the LoRA.
    Added last, so the ids of the other nodes stay what they were."""
    prompt = g.add("CLIPTextEncode", pos, title="Sample prompt (use your trigger word)", text=text)
    g.connect(checkpoint.out("CLIP"), prompt, "clip")
    g.connect(prompt.out(0), train, "sample_prompts")
    g.connect(checkpoint.out("VAE"), train, "vae")
    train.widgets["sample_every_steps"] = every
    grid = g.add("SaveImage", (pos[0] + 420, pos[1]), title="Sample grid (rows = steps)",
                 filename_prefix=f"{prefix}_samples")
    g.connect(train.out("samples"), grid, "images")
    return prompt


def images_one_caption(g: Graph):
    _note(g, f"""
## Train a LoRA: a folder of images, one caption for all
1. Put 5-50 images of your subject in **ComfyUI/input/{FOLDER}/** (press R in the editor to refresh the folder list).
2. Pick your SD1.5 checkpoint in **Load Checkpoint** and write the caption (keep a rare trigger word such as *sks*).
3. Queue. The LoRA is written to **models/loras/** (`my_lora_{STEPS}_steps_00001_.safetensors`) and the loss chart to **output/**.
Every {STEPS // 4} steps Train LoRA draws the **sample prompt** (shown on the node, saved to
**output/checkpoints/lora_samples/step_N_0.png**); the grid of all samples is saved at the end.
Start with 100-300 steps; learning rate 1e-4 to 5e-4; rank 8-16.
""", height=260)
    ckpt = _checkpoint(g)
    images = _images(g, (X0, 200))
    caption = _caption(g, (X0, 560))
    data = _make_dataset(g, (X1, 200), images, ckpt, caption.out(0))
    train = _train(g, (X2, 0), ckpt.out("MODEL"), data.out("latents"), data.out("conditioning"))
    _save_and_plot(g, train, "my_lora")
    _sample_prompt(g, train, ckpt, (X1, 520), "my_lora")


def captioned_folder(g: Graph):
    _note(g, f"""
## Train a LoRA from images with their own captions
Put images in **ComfyUI/input/{FOLDER}/** with a caption file beside each (`cat.png` + `cat.txt`).
kohya-ss layout works too: subfolders named `10_mytoy` repeat their images 10 times.
The trigger word is put in front of every caption; images without a .txt get the default caption
(set *missing_captions* to **error** to be told which ones lack a caption instead).
""")
    ckpt = _checkpoint(g)
    images = _captioned_images(g, (X0, 200))
    data = _make_dataset(g, (X1, 200), images, ckpt, images.out("texts"))
    train = _train(g, (X2, 0), ckpt.out("MODEL"), data.out("latents"), data.out("conditioning"))
    _save_and_plot(g, train, "my_captioned_lora")
    _sample_prompt(g, train, ckpt, (X1, 520), "my_captioned_lora")


def mixed_resolutions(g: Graph):
    _note(g, f"""
## Mixed image sizes: resolution buckets
Images of any size and aspect ratio in **ComfyUI/input/{FOLDER}/** (no resizing in the loader).
**Resolution Bucket** fits each image to the nearest bucket of about {RESOLUTION}x{RESOLUTION} pixels
(sides in steps of 64 px) and groups equal sizes, so batches of batch_size > 1 come from one bucket.
Keep **bucket_mode** on (LoRA Memory Settings; on by default). The bucket table is shown on the Resolution
Bucket node.
""")
    ckpt = _checkpoint(g)
    images = g.add(P + "LoadImageTextDataset", (X0, 200), folder=FOLDER, resize="none",
                   trigger_word="sks toy", default_caption=CAPTION)
    bucket = g.add(P + "ResolutionBucket", (X1, 0), resolution=RESOLUTION)
    g.connect(images.out("images"), bucket, "images")
    data = g.add(P + "MakeTrainingDataset", (X1, 330))
    g.connect(bucket.out("images"), data, "images")
    g.connect(ckpt.out("VAE"), data, "vae")
    g.connect(ckpt.out("CLIP"), data, "clip")
    g.connect(images.out("texts"), data, "texts")
    train = _train(g, (X2, 0), ckpt.out("MODEL"), data.out("latents"), data.out("conditioning"), batch_size=2)
    _save_and_plot(g, train, "my_bucketed_lora")
    _sample_prompt(g, train, ckpt, (X1, 700), "my_bucketed_lora")


def save_dataset(g: Graph):
    _note(g, f"""
## Step 1 of 2: encode the dataset once and save it
Encodes the images of **ComfyUI/input/{FOLDER}/** with the checkpoint's VAE and text encoder and saves
latents + conditioning (safetensors shards and a manifest) as **lora_training_dataset**.
Then open *train_from_saved_dataset* and train as often as you like without re-encoding.
""")
    ckpt = _checkpoint(g)
    images = _captioned_images(g, (X0, 200))
    data = _make_dataset(g, (X1, 200), images, ckpt, images.out("texts"))
    save = g.add(P + "SaveTrainingDataset", (X2, 200), folder_name="lora_training_dataset")
    g.connect(data.out("latents"), save, "latents")
    g.connect(data.out("conditioning"), save, "conditioning")
    g.connect(images.out("texts"), save, "texts")


def train_from_saved_dataset(g: Graph):
    _note(g, """
## Step 2 of 2: train from a saved dataset
Run *save_training_dataset* first (or pick any dataset saved by it or by ComfyUI's own Save Training Dataset).
Use the same checkpoint that encoded the dataset.
""")
    ckpt = _checkpoint(g)
    data = g.add(P + "LoadTrainingDataset", (X0, 200), folder_name="lora_training_dataset")
    train = _train(g, (X1, 0), ckpt.out("MODEL"), data.out("latents"), data.out("conditioning"))
    _save_and_plot(g, train, "my_lora_from_dataset", pos=(X2, 0))


def continue_training(g: Graph):
    _note(g, f"""
## Continue training an existing LoRA
Pick a LoRA written by Save LoRA Weights in **existing_lora**: its weights, optimizer state and step count are
restored, and *steps* more are trained (the saved file name and metadata carry the total).
Use the same dataset, rank and algorithm as the first run. Images: **ComfyUI/input/{FOLDER}/**.
""")
    ckpt = _checkpoint(g)
    images = _images(g, (X0, 200))
    caption = _caption(g, (X0, 560))
    data = _make_dataset(g, (X1, 200), images, ckpt, caption.out(0))
    train = _train(g, (X2, 0), ckpt.out("MODEL"), data.out("latents"), data.out("conditioning"),
                   existing_lora=f"my_lora_{STEPS}_steps_00001_.safetensors", steps=100)
    _save_and_plot(g, train, "my_lora_continued")
    _sample_prompt(g, train, ckpt, (X1, 520), "my_lora_continued", every=25)


def low_vram(g: Graph):
    _note(g, f"""
## Low VRAM: FP8 weights, bypass adapters
The diffusion model is loaded with **fp8_e4m3fn** weights (half the memory of fp16). **LoRA Memory Settings**
sets **training_dtype none** (compute in the model's own dtype), **bypass_mode** (adapters beside each layer, the
FP8 weights are never rewritten), gradient checkpointing and offloading. Use **bypass** in Load LoRA Model when
you generate with an FP8 model. Files: models/diffusion_models, models/text_encoders, models/vae.
Images: **ComfyUI/input/{FOLDER}/**.
""", height=260)
    unet = g.add("UNETLoader", (X0, 0), unet_name="v1-5-pruned-emaonly-unet.safetensors", weight_dtype="fp8_e4m3fn")
    clip = g.add("CLIPLoader", (X0, 170), clip_name="clip_l.safetensors", type="stable_diffusion")
    vae = g.add("VAELoader", (X0, 340), vae_name="vae-ft-mse-840000-ema-pruned.safetensors")
    images = _images(g, (X0, 470))
    caption = _caption(g, (X0, 830))
    data = g.add(P + "MakeTrainingDataset", (X1, 300))
    g.connect(images.out("images"), data, "images")
    g.connect(vae.out("VAE"), data, "vae")
    g.connect(clip.out("CLIP"), data, "clip")
    g.connect(caption.out(0), data, "texts")
    train = _train(g, (X2, 0), unet.out("MODEL"), data.out("latents"), data.out("conditioning"))
    save, _ = _save_and_plot(g, train, "my_lowvram_lora")
    memory = g.add(P + "MemorySettings", (X1, 640), training_dtype="none", bypass_mode=True,
                   gradient_checkpointing=True, offloading=True, quantized_backward=True)
    g.connect(memory.out("memory"), train, "memory")


def train_then_generate(g: Graph):
    _note(g, f"""
## Train, then generate with the new LoRA
Trains on **ComfyUI/input/{FOLDER}/** and samples an image with the LoRA applied by **Load LoRA Model**
(no file round trip needed; the file is saved too). Change the prompt to use your trigger word.
""")
    ckpt = _checkpoint(g)
    images = _images(g, (X0, 200))
    caption = _caption(g, (X0, 560))
    data = _make_dataset(g, (X1, 200), images, ckpt, caption.out(0))
    train = _train(g, (X2, 0), ckpt.out("MODEL"), data.out("latents"), data.out("conditioning"))
    _save_and_plot(g, train, "my_lora", pos=(X4, 0))
    apply = g.add(P + "LoadLoRAModel", (X3, 0), strength=1.0)
    g.connect(ckpt.out("MODEL"), apply, "model")
    g.connect(train.out("lora"), apply, "lora")
    positive = g.add("CLIPTextEncode", (X1, 620), title="Prompt", text="a photo of sks toy on a beach")
    negative = g.add("CLIPTextEncode", (X1, 840), title="Negative prompt", text="blurry, low quality")
    g.connect(ckpt.out("CLIP"), positive, "clip")
    g.connect(ckpt.out("CLIP"), negative, "clip")
    latent = g.add("EmptyLatentImage", (X2, 700), width=RESOLUTION, height=RESOLUTION, batch_size=1)
    sampler = g.add("KSampler", (X3, 300), seed=42, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal")
    g.connect(apply.out("model"), sampler, "model")
    g.connect(positive.out(0), sampler, "positive")
    g.connect(negative.out(0), sampler, "negative")
    g.connect(latent.out(0), sampler, "latent_image")
    decode = g.add("VAEDecode", (X4 + 420, 300))
    g.connect(sampler.out(0), decode, "samples")
    g.connect(ckpt.out("VAE"), decode, "vae")
    save = g.add("SaveImage", (X4 + 420, 440), filename_prefix="lora_sample")
    g.connect(decode.out(0), save, "images")


VIDEO_FOLDER = "lora_training_videos"


def video_folder(g: Graph):
    _note(g, f"""
## Wan 2.1: train a video LoRA from a folder of clips
1. Put 5-50 short videos (mp4, webm, mov, mkv, avi, gif) in **ComfyUI/input/{VIDEO_FOLDER}/**, each with a caption
   file beside it (`dance.mp4` + `dance.txt`); still images there train too, as one-frame clips.
   kohya-ss `10_name` subfolders repeat their videos.
2. Files: **models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors**, **models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors**,
   **models/vae/wan_2.1_vae.safetensors**.
3. **Sample Video Clips** cuts clips of 33 frames at 16 fps (Wan's rate; frame counts snap to 4k+1, read from the
   VAE), two per video spread evenly. **Resolution Bucket** crops each clip to a bucket of about 512x512 pixels
   (frames are decoded and cropped only when Make Training Dataset encodes that clip). Train LoRA keeps clips of one
   shape per batch (bucket_mode) and recomputes blocks (gradient checkpointing), both on by default.
""", height=300)
    unet = g.add("UNETLoader", (X0, 0), unet_name="wan2.1_t2v_1.3B_fp16.safetensors")
    clip = g.add("CLIPLoader", (X0, 170), clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan")
    vae = g.add("VAELoader", (X0, 340), vae_name="wan_2.1_vae.safetensors")
    videos = g.add(P + "LoadVideoTextDataset", (X0, 470), folder=VIDEO_FOLDER, trigger_word="sks dance",
                   default_caption="a video of sks dance")
    clips = g.add(P + "SampleVideoClips", (X1, 0), frames=33, frame_rule="from_vae", extraction="uniform",
                  target_fps=16.0, clips_per_video=2)
    g.connect(videos.out("videos"), clips, "videos")
    g.connect(videos.out("texts"), clips, "texts")
    g.connect(vae.out("VAE"), clips, "vae")
    bucket = g.add(P + "ResolutionBucket", (X1, 420), resolution=RESOLUTION)
    g.connect(clips.out("clips"), bucket, "videos")
    data = g.add(P + "MakeTrainingDataset", (X1, 760))
    g.connect(bucket.out("videos"), data, "videos")
    g.connect(vae.out("VAE"), data, "vae")
    g.connect(clip.out("CLIP"), data, "clip")
    g.connect(clips.out("texts"), data, "texts")
    train = _train(g, (X2, 0), unet.out("MODEL"), data.out("latents"), data.out("conditioning"),
                   learning_rate=0.0002, rank=16, alpha=16.0)
    _save_and_plot(g, train, "my_wan_video_lora")


EDIT_FOLDER = "lora_edit_pairs"


def edit_pairs(g: Graph):
    _note(g, f"""
## Edit-model LoRA (Qwen-Image-Edit): train on (control, target) pairs
Put pairs in **ComfyUI/input/{EDIT_FOLDER}/**: `cat.png` is the **target** (the edited result) and `cat_control.png`
its **control** (the input image), or `control/cat.png` in a control folder beside it (musubi-tuner / ai-toolkit
layout); `cat.txt` holds the edit instruction. Each control is VAE-encoded into its sample's own reference latents,
as TextEncodeQwenImageEdit does when you generate. For Flux.1 Kontext pick its model, text encoders and VAE and set
**edit_model** to Flux.1 Kontext; for Qwen-Image-Edit-2509 / 2511 raise **max_controls** (up to 3:
`cat_control_1.png`, `cat_control_2.png`, ...). FP8 weights, bypass and offloading (**LoRA Memory Settings**) as in the low-VRAM example.
""", height=300)
    unet = g.add("UNETLoader", (X0, 0), unet_name="qwen_image_edit_fp8_e4m3fn.safetensors", weight_dtype="fp8_e4m3fn")
    clip = g.add("CLIPLoader", (X0, 170), clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image")
    vae = g.add("VAELoader", (X0, 340), vae_name="qwen_image_vae.safetensors")
    pairs = g.add(P + "LoadEditPairsDataset", (X0, 470), folder=EDIT_FOLDER, resize="center_crop", width=1024,
                  height=1024, trigger_word="", default_caption="apply the edit", max_controls=1)
    data = g.add(P + "MakeTrainingDataset", (X1, 300), edit_model="Qwen-Image-Edit")
    g.connect(pairs.out("images"), data, "images")
    g.connect(vae.out("VAE"), data, "vae")
    g.connect(clip.out("CLIP"), data, "clip")
    g.connect(pairs.out("texts"), data, "texts")
    g.connect(pairs.out("controls"), data, "controls")
    train = _train(g, (X2, 0), unet.out("MODEL"), data.out("latents"), data.out("conditioning"),
                   learning_rate=0.0001, rank=16, alpha=16.0)
    _save_and_plot(g, train, "my_edit_lora")
    memory = g.add(P + "MemorySettings", (X1, 640), training_dtype="none", bypass_mode=True,
                   gradient_checkpointing=True, offloading=True)
    g.connect(memory.out("memory"), train, "memory")


EXAMPLES = {
    "lora_01_images_one_caption": images_one_caption,
    "lora_02_captioned_folder": captioned_folder,
    "lora_03_mixed_resolutions_buckets": mixed_resolutions,
    "lora_04a_save_training_dataset": save_dataset,
    "lora_04b_train_from_saved_dataset": train_from_saved_dataset,
    "lora_05_continue_training": continue_training,
    "lora_06_low_vram_fp8_bypass": low_vram,
    "lora_07_train_then_generate": train_then_generate,
    "lora_08_video_folder": video_folder,
    "lora_09_edit_pairs": edit_pairs,
}


def build_all(object_info: dict) -> dict[str, dict]:
    out = {}
    for name, build in EXAMPLES.items():
        g = Graph(object_info)
        build(g)
        workflow = g.to_ui()
        workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-lora-trainer/{name}"))  # stable, one per file
        out[name] = workflow
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    import os
    import tempfile

    from comfy_server import ComfyServer, build_fixture_models, comfy_python

    check = "--check" in argv
    if "--url" in argv:
        from urllib.request import urlopen
        with urlopen(argv[argv.index("--url") + 1].rstrip("/") + "/object_info") as answer:
            built = build_all(json.load(answer))
    else:
        root = Path(os.environ["COMFYUI_ROOT"])
        python = comfy_python(root)
        with tempfile.TemporaryDirectory() as base:
            server = ComfyServer(root, Path(base), python)
            server.prepare(build_fixture_models(root, python))
            server.start()
            try:
                built = build_all(server.object_info())
            finally:
                server.stop()
    stale = []
    EXAMPLES_DIR.mkdir(exist_ok=True)
    for name, workflow in built.items():
        path = EXAMPLES_DIR / f"{name}.json"
        text = dumps(workflow)
        if not path.exists() or path.read_text() != text:
            stale.append(path.name)
            if not check:
                path.write_text(text)
    print(("stale: " if check else "written: ") + (", ".join(stale) or "none"))
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
