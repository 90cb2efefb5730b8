"""Tiny random-weight models of every family the pack trains, built with ComfyUI's own classes.

Imported only inside ComfyUI's Python (the family matrix runs in-process there). Each `Family`
says how ComfyUI builds the model (`comfy.supported_models.<config_class>(unet_config)` ->
`get_model` -> `ModelPatcher`), with the real model's layout where it matters to a trainer
(latent channels and 4D / 5D layout, patch sizes, text-encoder widths, pooled vectors,
guidance, concat channels) and tiny widths and depths everywhere else, so one family trains in
seconds on a CPU. Weights are seeded, so every build of a family is the same model.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Family:
    name: str  # test id
    config_class: str  # comfy.supported_models class
    unet_config: dict
    latent: tuple[int, ...]  # one sample: (C, H, W) or (C, T, H, W)
    context: tuple[int, int]  # (tokens, width) of the text encoder output ComfyUI passes as cross_attn
    objective: str  # what ComfyUI's model_sampling makes the native target: eps / v / flow
    extras: Callable[[torch.Generator], dict] = lambda g: {}  # other conditioning keys (pooled_output...)
    state_dict_hints: Callable[[], dict] = dict  # keys get_model reads to choose the model type
    shift: float | None = None  # ComfyUI's flow shift for the family (None: not a shifted flow model)
    shift_is_mu: bool = False  # ComfyUI samples it with ModelSamplingFlux: sigma = e^mu / (e^mu + 1/t - 1)
    gradient_dtype: torch.dtype = torch.float64  # of the finite-difference check
    resolution_shift: bool = False  # Flux.1 dev: shift from the image size, as ComfyUI's ModelSamplingFlux node
    needs_inplace_fix: bool = False  # ComfyUI's model code writes into tensors autograd saved
    note: str = ""


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _pooled(width: int) -> Callable[[torch.Generator], dict]:
    return lambda g: {"pooled_output": _randn(g, 1, width)}


def _no_pooled(g: torch.Generator) -> dict:
    # Text encoders without a pooled vector still put the key in the conditioning (as None).
    return {"pooled_output": None}


def _unet(context_dim: int, adm: int | None, **extra) -> dict:
    """A two-level UNet: one res block per level, a transformer at the second level and the middle."""
    return dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
        channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
        transformer_depth_middle=1, num_heads=-1, num_head_channels=16, use_spatial_transformer=True,
        context_dim=context_dim, use_linear_in_transformer=True, legacy=False, adm_in_channels=adm,
        use_temporal_resblock=False, use_temporal_attention=False,
        **({"num_classes": "sequential"} if adm else {}), **extra,
    )


def _flux(guidance: bool) -> dict:
    return dict(image_model="flux", guidance_embed=guidance, in_channels=16, out_channels=16, vec_in_dim=768,
                context_in_dim=4096, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, txt_ids_dims=[])


def _wan(in_dim: int, out_dim: int, model_type: str = "t2v") -> dict:
    return dict(image_model="wan2.1", model_type=model_type, dim=64, out_dim=out_dim, in_dim=in_dim, num_heads=2,
                ffn_dim=128, num_layers=2, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6, text_dim=4096)


def _v_prediction_hint() -> dict:
    # ComfyUI tells SD2.x v from eps by the spread of this norm bias in the checkpoint.
    return {"output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.linspace(-1.0, 1.0, 16)}


def _cosmos_config(image_model: str) -> dict:
    """Cosmos Predict2 and Anima (built on it) share one tiny DiT layout."""
    return dict(image_model=image_model, max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=2, num_heads=2,
        crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
        min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=False,
        rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
        extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0,
        rope_enable_fps_modulation=False)


FAMILIES: list[Family] = [
    Family("flux1_dev", "Flux", _flux(True), (16, 8, 8), (8, 4096), "flow",
           extras=lambda g: {"pooled_output": _randn(g, 1, 768), "guidance": 3.5},
           resolution_shift=True, needs_inplace_fix=True),
    Family("flux1_schnell", "FluxSchnell", _flux(False), (16, 8, 8), (8, 4096), "flow", _pooled(768), shift=1.0,
           needs_inplace_fix=True),
    Family("chroma", "Chroma", dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=64, mlp_ratio=2.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=32, n_layers=1, txt_ids_dims=[], vec_in_dim=None),
        (16, 8, 8), (8, 4096), "flow", shift=1.15, shift_is_mu=True, needs_inplace_fix=True),
    Family("flux2", "Flux2", dict(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=7680, hidden_size=64,
        mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True,
        ops_bias=False, default_ref_method="index", ref_index_scale=10.0),
        (128, 4, 4), (8, 7680), "flow", extras=lambda g: {"guidance": 4.0}, shift=2.02, shift_is_mu=True,
        needs_inplace_fix=True),
    Family("sdxl", "SDXL", _unet(2048, 2816), (4, 8, 8), (8, 2048), "eps", _pooled(1280)),
    Family("qwen_image", "QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=3584, axes_dims_rope=(8, 12, 12)),
        (16, 1, 8, 8), (8, 3584), "flow", shift=1.15, shift_is_mu=True),
    Family("zimage", "ZImage", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=2560, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, axes_dims=[32, 48, 48], axes_lens=[64, 64, 64],
        rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, multiple_of=16, z_image_modulation=True, time_scale=1000.0),
        (16, 8, 8), (8, 2560), "flow", shift=3.0),
    Family("wan21_t2v", "WAN21_T2V", _wan(16, 16), (16, 3, 8, 8), (8, 4096), "flow", shift=8.0),
    Family("wan22_5b", "WAN22_T2V", _wan(48, 48), (48, 3, 4, 4), (8, 4096), "flow", shift=8.0),
    Family("wan21_i2v", "WAN21_I2V", _wan(36, 16, "i2v"), (16, 3, 8, 8), (8, 4096), "flow", shift=8.0,
           extras=lambda g: {"concat_latent_image": _randn(g, 1, 16, 3, 8, 8),
                             "concat_mask": torch.cat([torch.zeros(1, 1, 1, 8, 8), torch.ones(1, 1, 2, 8, 8)], 2)}),
    Family("hunyuan_video15", "HunyuanVideo15", dict(
        image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=3584,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
        use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True),
        (32, 3, 8, 8), (8, 3584), "flow", _no_pooled, shift=7.0, needs_inplace_fix=True),
    Family("ltxv", "LTXV", dict(
        image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2,
        caption_channels=4096, num_layers=2),
        (128, 2, 4, 4), (8, 4096), "flow", lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}, shift=2.37,
        shift_is_mu=True, needs_inplace_fix=True),
    Family("sd35", "SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        num_patches=256, pos_embed_max_size=16, qk_norm="rms", pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[0]),
        (16, 8, 8), (8, 4096), "flow", _pooled(2048), shift=3.0),
    Family("hidream", "HiDream", dict(
        image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=32, num_attention_heads=2, caption_channels=[4096, 4096], text_emb_dim=2048,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[16, 8, 8], max_resolution=[16, 16],
        llama_layers=[0, 1]),
        (16, 8, 8), (8, 4096), "flow",
        extras=lambda g: {"pooled_output": _randn(g, 1, 2048), "conditioning_llama3": _randn(g, 1, 2, 8, 4096)},
        shift=1.0, note="ComfyUI's HiDream config sets no shift (workflows add ModelSamplingSD3 3.0)"),
    Family("cosmos_predict2", "CosmosT2IPredict2", _cosmos_config("cosmos_predict2"),
        (16, 1, 8, 8), (8, 1024), "flow", needs_inplace_fix=True, gradient_dtype=torch.float32,
        note="rectified flow on EDM sigmas (COSMOS_RFLOW); fused comfy_kitchen rope op (no float64 kernel)"),
    Family("anima", "Anima", _cosmos_config("anima"),
        (16, 1, 8, 8), (8, 1024), "flow",
        extras=lambda g: {"t5xxl_ids": torch.randint(0, 32128, (8,), generator=g), "t5xxl_weights": torch.ones(8)},
        shift=3.0, needs_inplace_fix=True, gradient_dtype=torch.float32,
        note="Cosmos Predict2 blocks + a fixed-size 1024-wide LLM adapter (frozen; ~130M parameters)"),
    Family("kandinsky5", "Kandinsky5", dict(
        image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768,
        time_dim=32, model_dim=64, ff_dim=128, visual_embed_dim=132, patch_size=(1, 2, 2), num_text_blocks=1,
        num_visual_blocks=2, axes_dims=(8, 12, 12)),
        (16, 3, 8, 8), (8, 3584), "flow", _pooled(768), shift=10.0),
    Family("sd2_v", "SD20", _unet(1024, None), (4, 8, 8), (8, 1024), "v", state_dict_hints=_v_prediction_hint),
    Family("auraflow", "AuraFlow", dict(
        max_seq=64, cond_seq_dim=2048, n_double_layers=1, n_layers=2, dim=64, n_heads=2, patch_size=2,
        in_channels=4, out_channels=4, global_conddim=64),
        (4, 8, 8), (8, 2048), "flow", shift=1.73),
]
BY_NAME = {family.name: family for family in FAMILIES}


def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded values for every tensor: ComfyUI's layers skip init (real weights come from files).

    Matrices get a 1/sqrt(fan_in) spread so activations stay near unit scale through the blocks;
    norm scales are one, biases and other vectors small, so the random model is a tame function.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / max(1, p[0].numel()) ** 0.5)
            elif name.endswith(("weight", "scale")) and "norm" in name.lower():
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def model_config(family: Family, dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None):
    config = getattr(comfy.supported_models, family.config_class)(dict(family.unet_config))
    config.set_inference_dtype(dtype, manual_cast)
    return config


def build_state_dict(family: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """The family's tiny diffusion model weights (float32), seeded."""
    model = model_config(family).get_model(family.state_dict_hints())
    init_weights(model.diffusion_model, torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}


def build_patcher(family: Family, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  manual_cast: torch.dtype | None = None):
    """A ModelPatcher over the family's model with `weights`, as ComfyUI's loaders hand it to nodes."""
    model = model_config(family, dtype, manual_cast).get_model(family.state_dict_hints())
    model.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=False)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def conditioning(family: Family, seed: int) -> list:
    """One sample's CONDITIONING ([[cross_attn, extras]]) with the family's real widths."""
    g = torch.Generator().manual_seed(seed)
    tokens, width = family.context
    return [[_randn(g, 1, tokens, width), family.extras(g)]]


def latents(family: Family, count: int = 2, seed: int = 100) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [_randn(g, *family.latent) for _ in range(count)]


def flux_resolution_shift(latent_hw: tuple[int, int], base: float = 0.5, top: float = 1.15) -> float:
    """mu of ComfyUI's ModelSamplingFlux node for a latent of this size (2x2 patches)."""
    tokens = latent_hw[0] * latent_hw[1] / 4
    slope = (top - base) / (4096 - 256)
    return tokens * slope + base - slope * 256


def flux_sigma(t: float, mu: float) -> float:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
