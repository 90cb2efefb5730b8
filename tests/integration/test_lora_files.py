"""A saved LoRA works in ComfyUI's own LoraLoader exactly as in our Load LoRA Model."""
import numpy as np
import pytest

from comfy_server import CHECKPOINT
from datasets import write_images
from helpers import example_prompt, node_id, read_safetensors, saved_lora_name

FOLDER = "it_lora_files"


@pytest.fixture(scope="module")
def trained(comfy):
    """A LoRA trained hard enough (high learning rate) to change samples visibly; also exported kohya-style."""
    write_images(comfy.input_dir / FOLDER, [(64, 64)] * 3, captions=False, seed=3)
    prompt = example_prompt("lora_01_images_one_caption", comfy.object_info(),
                            LoadImageDataset={"folder": FOLDER},
                            TrainLoRA={"learning_rate": 0.01, "rank": 4, "alpha": 4.0, "seed": 11},
                            SaveLoRAWeights={"prefix": "it/equivalence", "kohya_export": True})
    result = comfy.run_ok(prompt)
    return saved_lora_name(result, prompt)


def sampling_branches(loras: dict) -> dict:
    """One prompt: the tiny checkpoint sampled (fixed seed, 3 steps, 64 px) through each model source.
    loras: branch name -> ("core" | "merged" | "bypass" | "none", lora file)."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of sks toy"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    for branch, (how, lora) in loras.items():
        model = ["ckpt", 0]
        if how == "core":
            prompt[f"{branch}_lora"] = {"class_type": "LoraLoader", "inputs": {
                "model": model, "clip": ["ckpt", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0}}
            model = [f"{branch}_lora", 0]
        elif how in ("merged", "bypass"):
            prompt[f"{branch}_lora"] = {"class_type": "LoRATrainer_LoadLoRAModel", "inputs": {
                "model": model, "lora_name": lora, "strength": 1.0, "bypass": how == "bypass"}}
            model = [f"{branch}_lora", 0]
        prompt[f"{branch}_sample"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "seed": 5, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        prompt[f"{branch}_save"] = {"class_type": "SaveLatent", "inputs": {
            "samples": [f"{branch}_sample", 0], "filename_prefix": f"it_latents/{branch}"}}
    return prompt


def latents_of(comfy, result, prompt) -> dict:
    out = {}
    for key in prompt:
        if key.endswith("_save"):
            saved = result.outputs[key]["latents"][0]
            tensors, _ = read_safetensors(comfy.output_dir / saved["subfolder"] / saved["filename"])
            out[key[:-len("_save")]] = tensors["latent_tensor"]
    return out


def test_core_lora_loader_matches_load_lora_model(comfy, trained):
    kohya = trained.replace(".safetensors", "_kohya.safetensors")
    assert (comfy.models_dir / "loras" / kohya).exists(), "kohya export was not written"
    prompt = sampling_branches({"base": ("none", None), "core": ("core", trained), "merged": ("merged", trained),
                                "bypass": ("bypass", trained), "core_kohya": ("core", kohya)})
    result = comfy.run_ok(prompt)
    assert "lora key not loaded" not in result.log, result.log[-4000:]
    latents = latents_of(comfy, result, prompt)
    scale = np.abs(latents["core"]).mean()
    effect = np.abs(latents["core"] - latents["base"]).max()
    assert effect > 1e-3 * scale, f"the LoRA changes nothing (max diff {effect})"
    np.testing.assert_allclose(latents["merged"], latents["core"], atol=1e-4 * max(scale, 1.0), rtol=1e-4)
    np.testing.assert_allclose(latents["core_kohya"], latents["core"], atol=1e-4 * max(scale, 1.0), rtol=1e-4)
    np.testing.assert_allclose(latents["bypass"], latents["core"], atol=1e-3 * max(scale, 1.0), rtol=1e-3)


def test_file_keys_are_comfyui_internal_names(comfy, trained):
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / trained)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors), sorted(tensors)[:5]
    assert {"algorithm", "rank", "alpha", "steps"} <= set(metadata)
    kohya, _ = read_safetensors(comfy.models_dir / "loras" / trained.replace(".safetensors", "_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya), sorted(kohya)[:5]
