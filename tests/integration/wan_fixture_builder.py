"""Build a tiny random-weight Wan 2.1 text-to-video model and Wan 2.1 VAE with ComfyUI's own classes.

Run inside the ComfyUI venv with the ComfyUI checkout as the working directory:
    python wan_fixture_builder.py OUT_DIR

Writes, under OUT_DIR (folder names are ComfyUI model folders):
    diffusion_models/tiny_wan21_t2v.safetensors   WanModel (t2v): dim 128 (one 128-wide head, which is what
                                                   detection derives from dim), 2 blocks, text_dim 768 so the
                                                   tiny CLIP-L of the SD1.5 fixture can be its text encoder
                                                   (text_dim travels in the file's "config" metadata, which
                                                   ComfyUI's detection reads)
    vae/tiny_wan21_vae.safetensors                Wan 2.1 VAE with base width 8 (ComfyUI reads it from
                                                   decoder.head.0.gamma); 4x time, 8x space compression
    manifest.json                                 parameter counts, file list

ComfyUI detects both as Wan 2.1 (WAN21_T2V, Wan21 latent format; the VAE's downscale_index_formula is
(4, 8, 8)). Weights come from a seeded generator, so every build writes the same files.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import comfy.ops  # noqa: E402
from comfy.ldm.wan.model import WanModel  # noqa: E402
from comfy.ldm.wan.vae import WanVAE  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TEXT_DIM = 768
WAN_CONFIG = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=128, ffn_dim=256, freq_dim=256,
                  text_dim=TEXT_DIM, out_dim=16, num_heads=1, num_layers=2)
VAE_CONFIG = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3, dropout=0.0)
SAVE_DTYPE = torch.float16


def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI's ops skip weight init; give every tensor seeded values (norm scales 1)."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("gamma") or (p.ndim == 1 and name.endswith("weight")):
                p.fill_(1.0)
            elif p.ndim >= 2:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)


def main(out_dir):
    generator = torch.Generator().manual_seed(4321)
    wan = WanModel(**WAN_CONFIG, operations=comfy.ops.disable_weight_init, device="cpu")
    init_weights(wan, generator)
    vae = WanVAE(**VAE_CONFIG)
    init_weights(vae, generator)
    files = {
        "diffusion_models/tiny_wan21_t2v.safetensors": (
            wan.state_dict(), {"config": json.dumps({"transformer": {"text_dim": TEXT_DIM}})}),
        "vae/tiny_wan21_vae.safetensors": (vae.state_dict(), None),
    }
    counts = {}
    for rel, (sd, metadata) in files.items():
        tensors = {k: v.detach().to(SAVE_DTYPE).contiguous() for k, v in sd.items()}
        counts[rel] = sum(t.numel() for t in tensors.values())
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)
    manifest = {"params": counts, "files": sorted(files)}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main(sys.argv[1])
