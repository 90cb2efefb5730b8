"""A real loader path for non-SD1.5 families, over the HTTP API of a running ComfyUI.

Tiny Flux.1 dev and Wan 2.1 T2V files in models/diffusion_models that ComfyUI's own detection
takes for those families (family_fixture_builder.py checks that while building them) load in the
core UNETLoader, train through the saved-dataset example workflow (lora_04b: Load Training Dataset
-> Train LoRA -> Save LoRA Weights, with the UNETLoader in place of the checkpoint loader), and the
saved LoRA loads in ComfyUI's core LoraLoaderModelOnly with no "lora key not loaded" line and
samples. Text encoders and VAEs are not part of it: T5-XXL / umT5-XXL and the 16-channel VAEs are
built from fixed full-size configs, so the datasets hold random latents and conditioning of the
families' real shapes in place of Make Training Dataset's output.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_server import HERE, cache_root, comfy_python
from conftest import comfy_root
from it_helpers import example_prompt, node_id, read_safetensors, saved_lora_name

FIXTURE_VERSION = "tiny-families-v2"
# family -> (empty latent node for sampling, its inputs)
SAMPLING_LATENT = {
    "flux1_dev": ("EmptySD3LatentImage", {"width": 64, "height": 64, "batch_size": 1}),
    "wan21_t2v": ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 9, "batch_size": 1}),
}
EXPECTED_BASE_MODEL = {"flux1_dev": "Flux", "wan21_t2v": "WAN21_T2V"}


def build_family_fixtures(root: Path, timeout: float = 900) -> Path:
    target = cache_root() / FIXTURE_VERSION
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{FIXTURE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "manifest.json").exists():
            return target
        partial = target.parent / f"{FIXTURE_VERSION}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        proc = subprocess.run([comfy_python(root), str(HERE / "family_fixture_builder.py"), str(partial)], cwd=root,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"family fixture builder failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return target


@pytest.fixture(scope="module")
def family_files(comfy):
    fixtures = build_family_fixtures(comfy_root())
    manifest = json.loads((fixtures / "manifest.json").read_text())
    for rel in manifest["files"]:
        link = comfy.models_dir / rel
        if not link.exists():
            link.symlink_to(fixtures / rel)
    datasets = comfy.base_dir / "datasets"
    datasets.mkdir(exist_ok=True)
    for family in manifest["families"].values():
        link = datasets / family["dataset"]
        if not link.exists():
            shutil.copytree(fixtures / "datasets" / family["dataset"], link)
    return manifest["families"]


@pytest.mark.parametrize("family", ["flux1_dev", "wan21_t2v"])
def test_detected_family_trains_from_the_example_workflow_and_loads_in_core(comfy, family_files, family):
    files = family_files[family]
    info = comfy.object_info()
    assert files["unet"] in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    prompt = example_prompt("lora_04b_train_from_saved_dataset", info,
                            LoRATrainer_LoadTrainingDataset={"folder_name": files["dataset"]},
                            LoRATrainer_TrainLoRA={"steps": 4},
                            LoRATrainer_SaveLoRAWeights={"prefix": f"it_family/{family}"})
    checkpoint = node_id(prompt, "CheckpointLoaderSimple")
    prompt[checkpoint] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"], "weight_dtype": "default"}}
    result = comfy.run_ok(prompt)
    name = saved_lora_name(result, prompt)
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / name)
    assert metadata["base_model"] == EXPECTED_BASE_MODEL[family]
    assert metadata["prediction_type"] == "flow"
    assert any(k.startswith("diffusion_model.") and k.endswith(".lora_up.weight") for k in tensors)
    assert not any("embed" in k or "final_layer" in k or "head.head" in k for k in tensors), sorted(tensors)[:5]

    # ComfyUI's own loader applies every key, and the model samples with it.
    latent_node, latent_inputs = SAMPLING_LATENT[family]
    sample = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"], "weight_dtype": "default"}},
        "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": name,
                                                                 "strength_model": 1.0}},
        "data": {"class_type": "LoRATrainer_LoadTrainingDataset", "inputs": {"folder_name": files["dataset"]}},
        "empty": {"class_type": latent_node, "inputs": latent_inputs},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["lora", 0], "positive": ["data", 1], "negative": ["data", 1], "latent_image": ["empty", 0],
            "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                         "filename_prefix": f"it_family/{family}"}},
    }
    sampled = comfy.run_ok(sample)
    assert "lora key not loaded" not in sampled.log, sampled.log[-3000:]
    assert sampled.outputs["save"]["latents"], sampled.outputs
