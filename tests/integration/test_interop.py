"""Our nodes and ComfyUI's built-in training nodes mix: datasets, LORA_MODEL and files cross over."""
import numpy as np

from comfy_server import CHECKPOINT
from it_helpers import api_node, read_safetensors
from it_images import write_images

FOLDER = "it_interop"
CORE_DATASET = "it_core_dataset"


def sample(prompt: dict, key: str, model: list) -> None:
    prompt[f"{key}_sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["empty", 0],
        "seed": 3, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt[f"{key}_save"] = {"class_type": "SaveLatent", "inputs": {
        "samples": [f"{key}_sample", 0], "filename_prefix": f"it_interop/{key}"}}


def latent(comfy, result, key):
    saved = result.outputs[f"{key}_save"]["latents"][0]
    return read_safetensors(comfy.output_dir / saved["subfolder"] / saved["filename"])[0]["latent_tensor"]


def test_core_dataset_trains_in_ours_and_loras_cross_over(comfy):
    write_images(comfy.input_dir / FOLDER, [(64, 64)] * 2, captions=False, seed=5)
    # 1. ComfyUI's own dataset nodes write a dataset (pickle shards).
    comfy.run_ok({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "load": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": FOLDER}},
        "make": {"class_type": "MakeTrainingDataset", "inputs": {
            "images": ["load", 0], "vae": ["ckpt", 2], "clip": ["ckpt", 1], "texts": "a photo of sks toy"}},
        "save": {"class_type": "SaveTrainingDataset", "inputs": {
            "latents": ["make", 0], "conditioning": ["make", 1], "folder_name": CORE_DATASET, "shard_size": 100}},
    })
    # 2. Our Load Training Dataset reads it and Train LoRA trains on it; the LORA_MODEL goes into core's
    #    LoraModelLoader and into ours (same sample expected); core's trainer output goes into our Save LoRA Weights.
    info = comfy.object_info()
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "data": api_node(info, "LoRATrainer_LoadTrainingDataset", folder_name=CORE_DATASET),
        "train": api_node(info, "LoRATrainer_TrainLoRA", model=["ckpt", 0], latents=["data", 0],
                          positive=["data", 1], steps=2, learning_rate=0.01, rank=4, alpha=4.0, seed=1),
        "core_train": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["ckpt", 0], "latents": ["data", 0], "positive": ["data", 1], "batch_size": 1,
            "grad_accumulation_steps": 1, "steps": 1, "learning_rate": 0.0005, "rank": 4, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32",
            "quantized_backward": False, "algorithm": "LoRA", "gradient_checkpointing": True,
            "checkpoint_depth": 1, "offloading": False, "existing_lora": "[None]", "bucket_mode": False,
            "bypass_mode": False}},
        "save_core": api_node(info, "LoRATrainer_SaveLoRAWeights", lora=["core_train", 0], prefix="it/core_trained",
                              steps=["core_train", 2]),
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of sks toy"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "core_apply": {"class_type": "LoraModelLoader", "inputs": {
            "model": ["ckpt", 0], "lora": ["train", 0], "strength_model": 1.0, "bypass": False}},
        "our_apply": api_node(info, "LoRATrainer_LoadLoRAModel", model=["ckpt", 0], lora=["train", 0], strength=1.0,
                              bypass=False),
    }
    sample(prompt, "core", ["core_apply", 0])
    sample(prompt, "ours", ["our_apply", 0])
    result = comfy.run_ok(prompt, timeout=900)
    np.testing.assert_allclose(latent(comfy, result, "ours"), latent(comfy, result, "core"), rtol=1e-4, atol=1e-4)

    name = result.outputs["save_core"]["text"][0].removeprefix("saved loras/")
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / name)
    assert any(k.endswith("lora_up.weight") for k in tensors), sorted(tensors)[:5]
