"""Tiny diffusion-model files that ComfyUI's own detection (comfy/model_detection.py) takes for
Flux.1 dev and Wan 2.1 T2V, plus a saved training dataset of each family's shapes.

Run inside ComfyUI's Python with the ComfyUI checkout as the working directory:
    python family_fixture_builder.py OUT_DIR

Writes, under OUT_DIR:
    diffusion_models/tiny_family_flux1_dev.safetensors   detected as Flux (dev: guidance_in present)
    diffusion_models/tiny_family_wan21_t2v.safetensors   detected as WAN21_T2V
    datasets/it_flux1_dev/, datasets/it_wan21_t2v/ our saved-dataset format: two latents of the
                                                  family's layout with conditioning of its real widths
    manifest.json                                 files, parameter counts, what detection said

Detection reads the widths off the weights but fixes what it cannot read: Flux's head size is
sum(axes_dim) = 128 and its MLP ratio 4, Wan's head size 128. The tiny models therefore have one
head of 128 (hidden size 128) and one or two blocks; everything else is as small as that allows.
Text encoders (T5-XXL, umT5-XXL) and the 16-channel VAEs cannot be made small: ComfyUI builds
them from fixed configs. The datasets stand in for what Make Training Dataset would encode.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO_ROOT)

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import comfy.model_detection  # noqa: E402
import comfy.supported_models  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_core.data.saved_dataset import SampleInfo, SaveOptions, save_dataset  # noqa: E402
from family_models import init_weights  # noqa: E402  (this script's folder; same seeded init as the matrix)

FAMILIES = {
    "flux1_dev": {
        "config_class": "Flux",
        "expected": "Flux",
        "unet_config": dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, vec_in_dim=768,
                            context_in_dim=4096, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1,
                            depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                            txt_ids_dims=[]),
        "latent": (16, 8, 8),
        "context": (8, 4096),
        "pooled": 768,
    },
    "wan21_t2v": {
        "config_class": "WAN21_T2V",
        "expected": "WAN21_T2V",
        "unet_config": dict(image_model="wan2.1", model_type="t2v", dim=128, out_dim=16, in_dim=16, num_heads=1,
                            ffn_dim=256, num_layers=2, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1),
                            qk_norm=True, cross_attn_norm=True, eps=1e-6, text_dim=4096),
        "latent": (16, 3, 8, 8),
        "context": (8, 4096),
        "pooled": None,
    },
}


def main(out_dir: str) -> None:
    generator = torch.Generator().manual_seed(4321)
    manifest = {"files": [], "families": {}}
    for name, spec in FAMILIES.items():
        config = getattr(comfy.supported_models, spec["config_class"])(spec["unet_config"])
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        init_weights(model.diffusion_model, generator)
        sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()}
        detected = comfy.model_detection.model_config_from_unet(sd, "")
        detected_name = type(detected).__name__ if detected is not None else None
        if detected_name != spec["expected"]:
            raise SystemExit(f"{name}: ComfyUI detects {detected_name}, expected {spec['expected']}")
        rel = f"diffusion_models/tiny_family_{name}.safetensors"  # the video fixture has tiny_wan21_t2v in the same server
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(sd, path + ".tmp")
        os.replace(path + ".tmp", path)
        manifest["files"].append(rel)

        latents = [torch.randn(spec["latent"], generator=generator) for _ in range(2)]
        conds = []
        for _ in range(2):
            extras = {"pooled_output": torch.randn(1, spec["pooled"], generator=generator) if spec["pooled"] else None}
            conds.append([[torch.randn(1, *spec["context"], generator=generator), extras]])
        save_dataset(os.path.join(out_dir, "datasets"), f"it_{name}", latents, conds,
                     [SampleInfo(caption=f"sample {i}") for i in range(2)],
                     SaveOptions(vae="random latents", text_encoder="random conditioning"))
        manifest["families"][name] = {"unet": os.path.basename(rel), "dataset": f"it_{name}",
                                      "detected": detected_name,
                                      "params": sum(v.numel() for v in sd.values())}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main(sys.argv[1])
