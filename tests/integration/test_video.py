"""Video LoRA end to end in a real ComfyUI, on a tiny random-weight Wan 2.1 model built with ComfyUI's classes.

The lora_08 example runs as shipped (test-sized overrides: the tiny Wan files, the tiny CLIP-L of the
SD1.5 fixture as text encoder, 9-frame clips, 64 px buckets, 3 steps) on videos written at test time
with PyAV: mp4 / webm / MOV, a kohya-ss repeat folder, a still image and captions. The LoRA it writes
is then applied by ComfyUI's core LoraLoaderModelOnly, which must load every key.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from comfy_server import CLIP_FILE, HERE, cache_root
from it_helpers import TEST_STEPS, api_node, example_prompt, node_id, read_safetensors, saved_lora_name

sys.path.insert(0, str(HERE.parent))
from video_files import write_video  # noqa: E402  (tests/video_files.py: PyAV, skips without it)

WAN_VERSION = "tiny-wan21-v1"
WAN_UNET = "tiny_wan21_t2v.safetensors"
WAN_VAE = "tiny_wan21_vae.safetensors"
VIDEO_FOLDER = "lora_training_videos"
WAN_OVERRIDES = {
    "UNETLoader": {"unet_name": WAN_UNET},
    "CLIPLoader": {"clip_name": CLIP_FILE, "type": "stable_diffusion"},
    "VAELoader": {"vae_name": WAN_VAE},
    "SampleVideoClips": {"frames": 9},
}


def build_wan_fixture(comfy) -> "os.PathLike":
    target = cache_root() / WAN_VERSION
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{WAN_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "manifest.json").exists():
            partial = target.parent / f"{WAN_VERSION}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            proc = subprocess.run([comfy.python, str(HERE / "wan_fixture_builder.py"), str(partial)],
                                  cwd=comfy.comfy_root, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"wan fixture builder failed:\n{proc.stdout}\n{proc.stderr}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
    return target


@pytest.fixture(scope="module")
def wan(comfy):
    fixture = build_wan_fixture(comfy)
    for rel in json.loads((fixture / "manifest.json").read_text())["files"]:
        link = comfy.models_dir / rel
        if not link.exists():
            link.symlink_to(fixture / rel)
    return fixture


@pytest.fixture(scope="module")
def object_info(comfy, wan):
    return comfy.object_info()


@pytest.fixture(scope="module")
def video_folder(comfy):
    folder = comfy.input_dir / VIDEO_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    write_video(folder / "walk.mp4", frames=24, fps=16, width=96, height=64)
    (folder / "walk.txt").write_text("a person walking")
    write_video(folder / "Turn.MOV", frames=20, fps=16, width=64, height=96)
    write_video(folder / "2_spin" / "spin.webm", frames=30, fps=24, width=64, height=64)
    (folder / "2_spin" / "spin.txt").write_text("spinning")
    Image.new("RGB", (80, 64), (200, 30, 30)).save(folder / "still.png")
    return folder


def test_08_video_folder_trains_a_wan_lora_that_core_loads(comfy, object_info, video_folder):
    prompt = example_prompt("lora_08_video_folder", object_info, **WAN_OVERRIDES)
    result = comfy.run_ok(prompt, timeout=1200)

    clips_ui = result.outputs[node_id(prompt, "SampleVideoClips")]["text"][0]
    # 3 videos x 2 clips (the kohya repeat lists spin's clips twice) of 9 frames, the still image as one frame
    assert "9 x" in clips_ui and "1 x   80 x 64" in clips_ui and "9 clips" in clips_ui, clips_ui
    bucket_ui = result.outputs[node_id(prompt, "ResolutionBucket")]["text"][0]
    assert "64 x 64" in bucket_ui, bucket_ui
    assert "encoded 0 images (0 distinct), 9 clips (7 distinct)" in result.log, result.log[-3000:]

    name = saved_lora_name(result, prompt)
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / name)
    assert metadata["steps"] == str(TEST_STEPS) and "WAN21_T2V" in metadata["base_model"], metadata
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in tensors, sorted(tensors)[:8]
    assert any(k.startswith("diffusion_model.blocks.1.ffn") for k in tensors)

    core = {
        "1": api_node(object_info, "UNETLoader", unet_name=WAN_UNET, weight_dtype="default"),
        "2": api_node(object_info, "LoraLoaderModelOnly", model=["1", 0], lora_name=name, strength_model=1.0),
        "3": api_node(object_info, "CLIPLoader", clip_name=CLIP_FILE, type="stable_diffusion"),
        "4": api_node(object_info, "CLIPTextEncode", clip=["3", 0], text="sks dance"),
        "5": api_node(object_info, "EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1),
        "6": api_node(object_info, "KSampler", model=["2", 0], positive=["4", 0], negative=["4", 0],
                      latent_image=["5", 0], seed=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                      denoise=1.0),
        "7": api_node(object_info, "SaveLatent", samples=["6", 0], filename_prefix="latents/wan_lora"),
    }
    sampled = comfy.run_ok(core, timeout=600)
    assert "lora key not loaded" not in sampled.log, sampled.log[-4000:]


def test_clips_connect_to_core_video_nodes(comfy, object_info, video_folder):
    """Our lazy clips are ComfyUI VIDEO values: core Get Video Components decodes exactly the clip."""
    prompt = {
        "1": api_node(object_info, "LoRATrainer_LoadVideoDataset", folder=VIDEO_FOLDER, include_images=False),
        "2": api_node(object_info, "LoRATrainer_SampleVideoClips", videos=["1", 0], frames=5,
                      frame_rule="4k+1 (Wan, HunyuanVideo)", extraction="head", target_fps=8.0),
        "3": api_node(object_info, "GetVideoComponents", video=["2", 0]),
        "4": api_node(object_info, "SaveImage", images=["3", 0], filename_prefix="video_frames"),
    }
    result = comfy.run_ok(prompt)
    images = result.outputs["4"]["images"]
    # 4 clips (walk, Turn, spin twice from its 2_ folder) x 5 frames
    assert len(images) == 20, len(images)
    # ...and core VIDEO values come in: core's folder loader (top level only: walk, Turn) into our sampler
    prompt["1"] = api_node(object_info, "LoadVideoDataSetFromFolder", folder=VIDEO_FOLDER)
    result = comfy.run_ok(prompt)
    assert len(result.outputs["4"]["images"]) == 10


def test_a_corrupt_video_names_the_file_or_is_skipped(comfy, object_info, video_folder):
    bad = comfy.input_dir / "videos_with_bad"
    shutil.rmtree(bad, ignore_errors=True)
    write_video(bad / "good.mp4", frames=9)
    (bad / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    prompt = {
        "1": api_node(object_info, "LoRATrainer_LoadVideoDataset", folder="videos_with_bad"),
        "2": api_node(object_info, "GetVideoComponents", video=["1", 0]),
        "3": api_node(object_info, "SaveImage", images=["2", 0], filename_prefix="bad_frames"),
    }
    failed = comfy.run(prompt)
    assert failed.status == "error" and "broken.mp4" in failed.error["exception_message"], failed.describe()
    prompt["1"]["inputs"]["skip_bad_files"] = True
    result = comfy.run_ok(prompt)
    assert len(result.outputs["3"]["images"]) == 9


def test_saved_video_dataset_keeps_5d_latents_and_frame_counts_and_trains(comfy, object_info, video_folder):
    save = {
        "1": api_node(object_info, "VAELoader", vae_name=WAN_VAE),
        "2": api_node(object_info, "CLIPLoader", clip_name=CLIP_FILE, type="stable_diffusion"),
        "3": api_node(object_info, "LoRATrainer_LoadVideoTextDataset", folder=VIDEO_FOLDER, include_images=True,
                      trigger_word="sks", default_caption="a clip", missing_captions="use_default"),
        "4": api_node(object_info, "LoRATrainer_SampleVideoClips", videos=["3", 0], texts=["3", 1], vae=["1", 0],
                      frames=6, extraction="head", target_fps=16.0),
        "5": api_node(object_info, "LoRATrainer_ResolutionBucket", videos=["4", 0], resolution=64),
        "6": api_node(object_info, "LoRATrainer_MakeTrainingDataset", videos=["5", 5], vae=["1", 0], clip=["2", 0],
                      texts=["4", 1]),
        "7": api_node(object_info, "LoRATrainer_SaveTrainingDataset", latents=["6", 0], conditioning=["6", 1],
                      texts=["4", 1], folder_name="video_ds", overwrite=True),
    }
    result = comfy.run_ok(save, timeout=600)
    assert "frames 6 snapped to 5" in result.outputs["4"]["text"][0]
    manifest = json.loads(next(comfy.base_dir.glob("**/video_ds/manifest.json")).read_text())
    shapes = sorted({(tuple(s["latent_shape"]), s["frames"]) for s in manifest["samples"]})
    # 5-frame clips -> 2 latent frames; the still image -> 1; 64x64 buckets -> 8x8 latents
    assert shapes == [((16, 1, 8, 8), 1), ((16, 2, 8, 8), 5)], shapes
    assert [s["repeats"] for s in manifest["samples"]] == [2, 1, 1, 1]   # 2_spin/spin, still, Turn, walk
    train = {
        "1": api_node(comfy.object_info(), "LoRATrainer_LoadTrainingDataset", folder_name="video_ds"),
        "2": api_node(object_info, "UNETLoader", unet_name=WAN_UNET, weight_dtype="default"),
        "3": api_node(object_info, "LoRATrainer_TrainLoRA", model=["2", 0], latents=["1", 0], positive=["1", 1],
                      steps=2, batch_size=2),
        "4": api_node(object_info, "LoRATrainer_SaveLoRAWeights", lora=["3", 0], steps=["3", 2],
                      prefix="wan_from_saved"),
    }
    trained = comfy.run_ok(train, timeout=600)
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / trained.outputs["4"]["text"][0][len("saved loras/"):])
    assert metadata["steps"] == "2" and tensors
