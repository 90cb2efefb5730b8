"""Sample images while training, in a real ComfyUI server on the tiny SD1.5 model.

One run samples two prompts (Create List of two CLIP Text Encodes) every 2 steps, before the first
step and at the step-3 checkpoint: the PNGs have the expected names, count and text, the grid
has one row per sampled step and one column per prompt, and the LoRA is bit-identical to the same
run without sampling. A run continued from the step-3 checkpoint samples the same later steps with
the same seeds and redraws the same pictures (as exactly as the continued weights match; the
difference is printed).
"""
import json

import numpy as np
import pytest
from PIL import Image

from it_helpers import api_node, read_safetensors, saved_lora_name
from it_images import write_images
from comfy_server import CHECKPOINT

FOLDER = "it_samples"
SIZE = 64
PROMPTS = ["a photo of sks toy", "a drawing of sks toy on grass"]
STEPS, EVERY, SAVE_EVERY = 6, 2, 3
ROWS = [0, 2, 3, 4, 6]  # sample_at_start, every 2, the checkpoint at 3, the last step


def training_prompt(info, prefix: str, sampling: bool, steps: int = STEPS, existing_lora: str = "[None]") -> dict:
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "images": api_node(info, "LoRATrainer_LoadImageDataset", folder=FOLDER, resize="center_crop", width=SIZE,
                           height=SIZE),
        "data": api_node(info, "LoRATrainer_MakeTrainingDataset", images=["images", 0], vae=["ckpt", 2],
                         clip=["ckpt", 1], texts="a photo of sks toy"),
        "settings": api_node(info, "LoRATrainer_TrainingSettings", checkpoint_prefix=prefix, lora_dtype="fp32"),
        "train": api_node(info, "LoRATrainer_TrainLoRA", model=["ckpt", 0], latents=["data", 0],
                          positive=["data", 1], steps=steps, learning_rate=0.01, rank=4, alpha=4.0, seed=3,
                          save_every_steps=SAVE_EVERY, sample_every_steps=EVERY, settings=["settings", 0],
                          existing_lora=existing_lora),
        "save": api_node(info, "LoRATrainer_SaveLoRAWeights", lora=["train", 0], steps=["train", 2],
                         prefix=f"{prefix}-final"),
    }
    if sampling:
        for k, text in enumerate(PROMPTS):
            prompt[f"text{k}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}}
        prompt["list"] = {"class_type": "CreateList",
                          "inputs": {f"inputs.input{k}": [f"text{k}", 0] for k in range(len(PROMPTS))}}
        prompt["negative"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}}
        prompt["sample_settings"] = api_node(info, "LoRATrainer_SampleSettings", steps=3, cfg=5.0, seed=7,
                                             sample_at_start=True)
        prompt["train"]["inputs"].update(sample_prompts=["list", 0], sample_negative=["negative", 0],
                                         vae=["ckpt", 2], sample_settings=["sample_settings", 0])
        prompt["grid"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 3],
                                                                 "filename_prefix": f"{prefix}_grid"}}
    return prompt


@pytest.fixture(scope="module")
def runs(comfy):
    write_images(comfy.input_dir / FOLDER, [(SIZE, SIZE)] * 3, captions=False, seed=5)
    info = comfy.object_info()
    sampled = comfy.run_ok(training_prompt(info, "it/sampled", sampling=True), timeout=1200)
    plain = comfy.run_ok(training_prompt(info, "it/plain", sampling=False), timeout=1200)
    return info, sampled, plain


def sample_folder(comfy, prefix: str):
    return comfy.output_dir / f"{prefix}_samples"


def test_sample_files_names_count_and_text(comfy, runs):
    folder = sample_folder(comfy, "it/sampled")
    expected = sorted(f"step_{step}_{k}.png" for step in ROWS for k in range(len(PROMPTS)))
    assert sorted(p.name for p in folder.iterdir()) == expected
    for step in ROWS:
        for k, text in enumerate(PROMPTS):
            image = Image.open(folder / f"step_{step}_{k}.png")
            assert image.size == (SIZE, SIZE)
            info = image.text
            assert info["step"] == str(step) and info["seed"] == str(7 + k) and info["sample_prompt"] == text
            record = json.loads(info["lora_trainer_sample"])
            assert record == {"step": step, "prompt_index": k, "seed": 7 + k, "prompt": text, "sampler": "euler",
                              "scheduler": "simple", "steps": 3, "cfg": 5.0}
            assert json.loads(info["prompt"])["train"]["class_type"] == "LoRATrainer_TrainLoRA"
    # each row is a different picture of the LoRA as it learns; the two prompts differ
    first, last = (np.asarray(Image.open(folder / f"step_{s}_0.png")) for s in (0, 6))
    assert not np.array_equal(first, last)
    assert not np.array_equal(np.asarray(Image.open(folder / "step_6_1.png")), last)


def test_the_grid_has_a_row_per_step_and_a_column_per_prompt(comfy, runs):
    _, sampled, plain = runs
    saved = sampled.outputs["grid"]["images"]
    assert len(saved) == 1
    grid = Image.open(comfy.output_dir / saved[0]["subfolder"] / saved[0]["filename"])
    assert grid.size == (SIZE * len(PROMPTS), SIZE * len(ROWS))
    cells = np.asarray(grid.convert("RGB"))
    folder = sample_folder(comfy, "it/sampled")
    for row, step in enumerate(ROWS):
        for k in range(len(PROMPTS)):
            cell = cells[row * SIZE:(row + 1) * SIZE, k * SIZE:(k + 1) * SIZE]
            assert np.array_equal(cell, np.asarray(Image.open(folder / f"step_{step}_{k}.png").convert("RGB")))
    # the node shows the sample files when the run ends
    shown = sampled.outputs["train"]["images"]
    assert len(shown) == len(ROWS) * len(PROMPTS) and shown[0]["type"] == "output"
    assert "grid" not in plain.outputs  # without prompts the grid output skips Save Image


def test_sampling_does_not_change_the_lora(comfy, runs):
    _, sampled, plain = runs
    lora_a, _ = read_safetensors(comfy.models_dir / "loras" / saved_lora_name(sampled, {"save": {
        "class_type": "LoRATrainer_SaveLoRAWeights"}}))
    lora_b, _ = read_safetensors(comfy.models_dir / "loras" / saved_lora_name(plain, {"save": {
        "class_type": "LoRATrainer_SaveLoRAWeights"}}))
    assert lora_a.keys() == lora_b.keys() and lora_a
    for key in lora_a:
        assert np.array_equal(lora_a[key], lora_b[key]), key


def test_checkpoints_line_up_with_rows_and_a_continued_run_redraws_the_same_samples(comfy, runs):
    info, _, _ = runs
    checkpoints = sorted(p.name for p in (comfy.models_dir / "loras" / "it").glob("sampled_*_steps_*.safetensors"))
    assert [name.split("_")[1] for name in checkpoints] == ["3"], checkpoints  # step 3 (the last step is the output)
    assert SAVE_EVERY in ROWS
    resumed = training_prompt(info, "it/resumed", sampling=True, steps=STEPS - SAVE_EVERY,
                              existing_lora=f"it/{checkpoints[0]}")
    resumed["sample_settings"]["inputs"]["sample_at_start"] = False
    result = comfy.run_ok(resumed, timeout=1200)
    loras = comfy.models_dir / "loras"
    whole, _ = read_safetensors(loras / "it" / next(p.name for p in (loras / "it").glob("sampled-final_*")))
    continued, _ = read_safetensors(loras / saved_lora_name(result, resumed))
    lora_diff = max(float(np.abs(whole[k] - continued[k]).max()) for k in whole)
    print(f"continued vs uninterrupted LoRA: max difference {lora_diff:.3g}")
    again, first = sample_folder(comfy, "it/resumed"), sample_folder(comfy, "it/sampled")
    assert sorted(p.name for p in again.iterdir()) == sorted(f"step_{s}_{k}.png" for s in (4, 6) for k in (0, 1))
    for path in sorted(again.iterdir()):
        redrawn, original = Image.open(path), Image.open(first / path.name)
        for key in ("step", "seed", "sample_prompt"):
            assert redrawn.text[key] == original.text[key], (path.name, key)
        # The same noise and (up to the resume's float rounding) the same weights: far closer to the
        # uninterrupted run's picture at this step than that picture is to its row two steps before.
        a, b = (np.asarray(image).astype(float) for image in (redrawn, original))
        step, k = path.stem.split("_")[1:]
        before = np.asarray(Image.open(first / f"step_{int(step) - 2}_{k}.png")).astype(float)
        print(f"{path.name}: mean difference {np.abs(a - b).mean():.3f} levels to the uninterrupted run, "
              f"{np.abs(b - before).mean():.3f} between its rows two steps apart")
        assert np.abs(a - b).mean() < 0.1 * np.abs(b - before).mean(), path.name
