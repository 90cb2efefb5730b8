"""A saved LoRA works in ComfyUI's own LoraLoader exactly as in our Load LoRA Model."""
import numpy as np
import pytest

from comfy_server import CHECKPOINT
from it_helpers import example_prompt, node_id, read_safetensors, saved_lora_name, write_safetensors
from it_images import write_images

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


def kohya_copy(comfy, name: str) -> str:
    """The kohya-named copy Save LoRA Weights wrote beside `name` (loras-relative name)."""
    path = comfy.models_dir / "loras" / name
    found = sorted(path.parent.glob(path.stem.rstrip("_") + "*kohya*.safetensors"))
    assert found, f"no kohya export beside {name}: {sorted(p.name for p in path.parent.iterdir())}"
    return str(found[0].relative_to(comfy.models_dir / "loras"))


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
    kohya = kohya_copy(comfy, trained)
    prompt = sampling_branches({"base": ("none", None), "core": ("core", trained), "merged": ("merged", trained),
                                "bypass": ("bypass", trained), "core_kohya": ("core", kohya),
                                "bypass_kohya": ("bypass", kohya)})
    result = comfy.run_ok(prompt)
    assert "lora key not loaded" not in result.log, result.log[-4000:]
    latents = latents_of(comfy, result, prompt)
    scale = np.abs(latents["core"]).mean()
    effect = np.abs(latents["core"] - latents["base"]).max()
    assert effect > 1e-3 * scale, f"the LoRA changes nothing (max diff {effect})"
    np.testing.assert_allclose(latents["merged"], latents["core"], atol=1e-4 * max(scale, 1.0), rtol=1e-4)
    np.testing.assert_allclose(latents["core_kohya"], latents["core"], atol=1e-4 * max(scale, 1.0), rtol=1e-4)
    np.testing.assert_allclose(latents["bypass"], latents["core"], atol=1e-3 * max(scale, 1.0), rtol=1e-3)
    np.testing.assert_allclose(latents["bypass_kohya"], latents["core"], atol=1e-3 * max(scale, 1.0), rtol=1e-3)


def test_file_keys_are_comfyui_internal_names(comfy, trained):
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / trained)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors), sorted(tensors)[:5]
    assert {"algorithm", "rank", "alpha", "steps"} <= set(metadata)
    kohya, _ = read_safetensors(comfy.models_dir / "loras" / kohya_copy(comfy, trained))
    assert all(k.startswith("lora_unet_") for k in kohya), sorted(kohya)[:5]


def test_loha_lokr_oft_files_load_in_core_lora_loader(comfy):
    """LyCORIS-named files from the other algorithms: core LoraLoader reads every key and samples as ours."""
    write_images(comfy.input_dir / FOLDER, [(64, 64)] * 3, captions=False, seed=3)
    algorithms = [a for a in ("LoHa", "LoKr", "OFT")
                  if a in comfy.object_info("LoRATrainer_TrainLoRA")["input"]["required"]["algorithm"][1]["options"]]
    prompt = example_prompt("lora_01_images_one_caption", comfy.object_info(),
                            LoadImageDataset={"folder": FOLDER}, TrainLoRA={"learning_rate": 0.01, "rank": 4,
                                                                            "alpha": 4.0, "steps": 2})
    train_id = next(k for k, n in prompt.items() if n["class_type"] == "LoRATrainer_TrainLoRA")
    save_id = next(k for k, n in prompt.items() if n["class_type"] == "LoRATrainer_SaveLoRAWeights")
    for key in [k for k, n in prompt.items() if n["class_type"] == "LoRATrainer_PlotLossGraph"]:
        del prompt[key]
    for algorithm in algorithms:  # one training branch per algorithm, sharing the encoded dataset
        prompt[f"train_{algorithm}"] = {**prompt[train_id], "inputs": {**prompt[train_id]["inputs"],
                                                                       "algorithm": algorithm}}
        prompt[f"save_{algorithm}"] = {**prompt[save_id], "inputs": {
            **prompt[save_id]["inputs"], "lora": [f"train_{algorithm}", 0], "steps": [f"train_{algorithm}", 2],
            "prefix": f"it/{algorithm.lower()}"}}
    del prompt[train_id], prompt[save_id]
    for key in [k for k, n in prompt.items()  # what else read the removed node (the samples grid's Save Image)
                if any(isinstance(v, list) and v[:1] == [train_id] for v in n["inputs"].values())]:
        del prompt[key]
    result = comfy.run_ok(prompt)
    names = {a: result.outputs[f"save_{a}"]["text"][0].removeprefix("saved loras/") for a in algorithms}
    branches = {"base": ("none", None)}
    for algorithm, name in names.items():
        branches[f"core_{algorithm}"] = ("core", name)
        branches[f"ours_{algorithm}"] = ("merged", name)
    sampled = comfy.run_ok(sampling_branches(branches))
    assert "lora key not loaded" not in sampled.log, sampled.log[-4000:]
    latents = latents_of(comfy, sampled, sampling_branches(branches))
    for algorithm in algorithms:
        core, ours = latents[f"core_{algorithm}"], latents[f"ours_{algorithm}"]
        assert np.abs(core - latents["base"]).max() > 0, f"{algorithm}: core loader applied nothing"
        np.testing.assert_allclose(ours, core, atol=1e-3 * max(np.abs(core).mean(), 1.0), rtol=1e-3,
                                   err_msg=algorithm)


# The names kohya-ss sd-scripts gives SD1.x layers (its UNet is named like diffusers'), for layers of the
# test model (channel_mult [1, 2]; attention in down level 0 and, in diffusers numbering, up level 0): checked against diffusers'
# UNet2DConditionModel in tests/test_interop_libraries.py.
SD_SCRIPTS_SD15_NAMES = [
    "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_attentions_1_proj_out",
    "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_mid_block_resnets_0_conv2",
]


def test_kohya_export_uses_sd_scripts_sd15_names_and_fields(comfy, trained):
    tensors, metadata = read_safetensors(comfy.models_dir / "loras" / kohya_copy(comfy, trained))
    modules = {k.split(".")[0] for k in tensors}
    assert set(SD_SCRIPTS_SD15_NAMES) <= modules, sorted(set(SD_SCRIPTS_SD15_NAMES) - modules)
    ldm = [m for m in modules if any(w in m for w in ("input_blocks", "output_blocks", "middle_block"))]
    assert not ldm, f"LDM names in the kohya export: {ldm[:5]}"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"


def test_sd_scripts_named_sd15_file_continues_training_and_loads_in_every_mode(comfy, trained):
    """A file as sd-scripts writes an SD1.5 LoRA (networks.lora: attention modules with diffusers block
    names, text-encoder modules, ss_* metadata) continues in Train LoRA and samples alike in core's
    LoraLoader and in Load LoRA Model merged and bypass."""
    kohya, _ = read_safetensors(comfy.models_dir / "loras" / kohya_copy(comfy, trained))
    state = {k: v for k, v in kohya.items() if "_attentions_" in k}
    rng = np.random.default_rng(0)
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    state.update({f"{te}.lora_down.weight": rng.standard_normal((4, 768)).astype(np.float32),
                  f"{te}.lora_up.weight": np.zeros((3072, 4), np.float32), f"{te}.alpha": np.array(4.0, np.float32)})
    modules = {k.split(".")[0] for k in state if k.startswith("lora_unet_")}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0", "ss_steps": "7",
                "ss_base_model_version": "sd_v1"}
    name = "it/sd_scripts_style.safetensors"
    write_safetensors(comfy.models_dir / "loras" / name, state, metadata)

    prompt = example_prompt("lora_01_images_one_caption", comfy.object_info(), LoadImageDataset={"folder": FOLDER},
                            TrainLoRA={"learning_rate": 0.01, "rank": 4, "alpha": 4.0, "steps": 2, "existing_lora": name},
                            SaveLoRAWeights={"prefix": "it/continued_sd_scripts", "kohya_export": True})
    result = comfy.run_ok(prompt)
    assert result.outputs[node_id(prompt, "SaveLoRAWeights")]["text"][0].startswith("saved loras/")
    continued, continued_metadata = read_safetensors(comfy.models_dir / "loras" / saved_lora_name(result, prompt))
    assert continued_metadata["steps"] == "9"  # 7 from ss_steps + 2
    assert len({k.rsplit(".", 2)[0] for k in continued if k.endswith(".lora_up.weight")}) == len(modules)
    assert "text-encoder tensors are not continued" in result.log

    branches = {"core": ("core", name), "merged": ("merged", name), "bypass": ("bypass", name)}
    sampled = comfy.run_ok(sampling_branches(branches))
    assert "lora key not loaded" not in sampled.log, sampled.log[-4000:]
    latents = latents_of(comfy, sampled, sampling_branches(branches))
    scale = max(np.abs(latents["core"]).mean(), 1.0)
    np.testing.assert_allclose(latents["merged"], latents["core"], atol=1e-4 * scale, rtol=1e-4)
    np.testing.assert_allclose(latents["bypass"], latents["core"], atol=1e-3 * scale, rtol=1e-3)
