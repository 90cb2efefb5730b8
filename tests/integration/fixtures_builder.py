"""Build a tiny random-weight SD1.5 checkpoint with ComfyUI's own classes.

Run inside the ComfyUI venv with the ComfyUI checkout as the working directory:
    python fixtures_builder.py OUT_DIR

Writes, under OUT_DIR (folder names are ComfyUI model folders):
    checkpoints/tiny_sd15.safetensors      UNet + VAE + CLIP-L, detected by ComfyUI as SD1.5
    diffusion_models/tiny_sd15_unet.safetensors   the same UNet alone (for UNETLoader)
    text_encoders/tiny_clip_l.safetensors  the same CLIP-L alone (for CLIPLoader, type stable_diffusion)
    vae/tiny_sd15_vae.safetensors          the same VAE alone (for VAELoader)
    manifest.json                          parameter counts

The UNet keeps what SD1.5 detection reads (model_channels 320, context_dim 768, no linear
projection in the transformers, no adm input) with two levels of one res block each, attention
(self + cross, depth 1) at the first level only and a middle block of one res block, so it has
about 64M parameters instead of 860M. The VAE encoder must keep ComfyUI's fixed SD layout; the
decoder is built with 32 base channels, which ComfyUI reads back from `decoder.conv_in`. The text
encoder is a full-size CLIP-L (ComfyUI builds it from a fixed config), with random weights.
All weights come from a seeded generator, so the files are the same on every build.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before model_management is imported: build on CPU whatever the machine has

import comfy.clip_model  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

UNET_CONFIG = dict(  # in the form ComfyUI's model_detection.detect_unet_config reads back
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
    channel_mult=[1, 2], transformer_depth=[1, 0], transformer_depth_output=[0, 0, 1, 1],
    transformer_depth_middle=-1, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
    context_dim=768, use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
    use_temporal_resblock=False, use_temporal_attention=False,
)
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
VAE_DECODER_CH = 32
SAVE_DTYPE = torch.float16


def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI's ops skip weight init (weights come from files); give every tensor seeded values."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)  # norm scales
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)


def build_unet(generator):
    unet = UNetModel(**UNET_CONFIG, operations=comfy.ops.disable_weight_init, device="cpu")
    init_weights(unet, generator)
    return unet


def build_vae(generator):
    decoder = dict(VAE_DDCONFIG, ch=VAE_DECODER_CH)
    vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4, decoder_ddconfig=decoder)
    init_weights(vae, generator)
    return vae


def build_clip(generator):
    with open(os.path.join("comfy", "sd1_clip_config.json")) as f:
        config = json.load(f)
    clip = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    init_weights(clip, generator)
    with torch.no_grad():  # CLIP embeddings are small in the real model; keep activations tame
        clip.text_model.embeddings.token_embedding.weight.mul_(0.02)
        clip.text_model.embeddings.position_embedding.weight.mul_(0.02)
    return clip


def prefixed(state_dict, prefix):
    return {prefix + k: v.detach().to(SAVE_DTYPE).contiguous() for k, v in state_dict.items()}


def count(state_dict):
    return sum(v.numel() for v in state_dict.values())


def main(out_dir):
    generator = torch.Generator().manual_seed(1234)
    unet_sd = prefixed(build_unet(generator).state_dict(), "")
    vae_sd = prefixed(build_vae(generator).state_dict(), "")
    clip_sd = prefixed(build_clip(generator).state_dict(), "")
    # SD1.5 checkpoints carry no text projection; standalone CLIP-L files do.
    checkpoint_clip = {k: v for k, v in clip_sd.items() if k != "text_projection.weight"}

    files = {
        "checkpoints/tiny_sd15.safetensors": {
            **prefixed(unet_sd, "model.diffusion_model."),
            **prefixed(vae_sd, "first_stage_model."),
            **prefixed(checkpoint_clip, "cond_stage_model.transformer."),
        },
        "diffusion_models/tiny_sd15_unet.safetensors": unet_sd,
        "text_encoders/tiny_clip_l.safetensors": clip_sd,
        "vae/tiny_sd15_vae.safetensors": vae_sd,
    }
    for rel, sd in files.items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(sd, path + ".tmp")
        os.replace(path + ".tmp", path)
    manifest = {"unet_params": count(unet_sd), "vae_params": count(vae_sd), "clip_params": count(clip_sd),
                "files": sorted(files)}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main(sys.argv[1])
