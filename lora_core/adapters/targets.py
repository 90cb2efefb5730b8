"""Which layers of a model get adapters, and which norms / biases get trained deltas.

A layer is a candidate by kind (Linear or Conv1d/2d/3d, subclasses included, so ComfyUI's cast
layers count) and then by its dotted name: a preset picks the usual layers of diffusion
transformers and UNets, `include` patterns add layers, `exclude` patterns remove them
(`re.search` on the dotted name, exclude wins). The presets were checked against ComfyUI's
SD1.5/SDXL UNet (attn1/attn2.to_q/k/v/to_out.0, ff.net.0.proj, ff.net.2, proj_in/proj_out),
Flux (img_attn.qkv/proj, img_mlp.0/2, single_blocks.N.linear1/linear2), SD3 MMDiT (attn.qkv/proj,
mlp.fc1/fc2), Wan (self_attn.q/k/v/o, ffn.0/2), Qwen-Image (to_q, add_q_proj, to_add_out,
img_mlp.net.*) and Lumina/Z-Image (attention.qkv/out, feed_forward.w1/w2/w3).

No preset adapts a model's embedders (patch / text / time / guidance / pooled-vector inputs), its
final layer, or its modulation (adaLN, img_mod / txt_mod, UNet emb_layers): `all` is every Linear /
Conv inside the transformer or UNet blocks. That is musubi-tuner's choice for every family it
trains (Flux, HunyuanVideo, Wan, Qwen-Image, Z-Image: the block classes only, modulation excluded)
and ai-toolkit's for Flux; these layers turn a style LoRA into one that shifts every timestep or
the whole colour range. Name them in `include` to train them anyway. Norms are not Linear / Conv;
they train only with `train_norms_and_biases`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .geometry import adaptable
from ..errors import UserInputError

# A name component that is an attention module ("attn1", "img_attn", "self_attn", "attention"),
# or a projection name only attention uses; Flux's single blocks fuse qkv (+mlp) into linear1
# and the output projection (+mlp) into linear2.
_ATTENTION = (
    r"(^|\.)[a-z0-9_]*(attn|attention)[a-z0-9_]*\."
    r"|(^|\.)(to_q|to_k|to_v|to_qkv|to_out|to_add_out|qkv|q_proj|k_proj|v_proj|o_proj|out_proj"
    r"|add_q_proj|add_k_proj|add_v_proj)(\.|$)"
    r"|(^|\.)single_blocks\.\d+\.linear[12]$"
)
# Feed-forward modules and the in/out projections of transformer blocks (HiDream's mixture of
# experts sits under ff_i, AuraFlow's under mlpC / mlpX).
_MLP = (
    r"(^|\.)(ff|ff_in|ffn|mlp|feed_forward|feedforward|[a-z0-9]+_mlp|mlp_[a-z0-9]+|mlp[A-Z]+|ff_context|ff_i|ff_t)\."
    r"|(^|\.)(fc1|fc2|proj_in|proj_out|gate_proj|up_proj|down_proj)$"
)
# Left out by every preset (see the module docstring). By family: modulation (Flux / HunyuanVideo
# img_mod, txt_mod, modulation.lin; Flux.2 *_stream_modulation; Qwen img_mod; SD3 / HiDream /
# Lumina adaLN_modulation; Cosmos adaln_modulation_*; Kandinsky *_modulation; LTX adaln_single;
# AuraFlow modC / modX / modF; UNet emb_layers), embedders (x_/t_/y_/p_/cap_embedder, *_embedding,
# time_embed, label_emb, img_in, txt_in (with HunyuanVideo's token refiner), time_in, vector_in,
# guidance_in, vision_in, Chroma's distilled_guidance_layer, LTX patchify_proj / caption_projection,
# AuraFlow init_x_linear / cond_seq_linear) and final layers (final_layer, head, norm_out,
# top-level proj_out / out / out_layer / final_linear, the UNet's first conv input_blocks.0.0).
_NOT_BY_DEFAULT = re.compile(
    r"(^|\.)[a-z0-9_]*(modulation|adaln|adaLN)[a-zA-Z0-9_]*(\.|$)"
    r"|(^|\.)(img_mod|txt_mod|mod[A-Z]+|emb_layers)(\.|$)"
    r"|(^|\.)[a-z0-9_]*(embedder|embedding|embeddings|embed)(\.|$)"
    r"|(^|\.)(label_emb|time_in|vector_in|guidance_in|img_in|txt_in|time_projection|time_text_embed|img_emb"
    r"|vision_in|byt5_in|distilled_guidance_layer|caption_projection|cond_seq_linear|init_x_linear"
    r"|patchify_proj|t_block|llm_adapter)(\.|$)"
    r"|^(final_layer|final_linear|norm_out|proj_out|head|out|out_layer)(\.|$)"
    r"|^input_blocks\.0\.0$"
)
PRESETS = {
    "attention": re.compile(_ATTENTION),
    "attention_mlp": re.compile(f"{_ATTENTION}|{_MLP}"),
    "all": re.compile(""),
}
_NORM_TYPES = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None
)


@dataclass
class TargetSpec:
    preset: str = "attention_mlp"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    train_norms_and_biases: bool = False

    def __post_init__(self) -> None:
        self.include = list(self.include)
        self.exclude = list(self.exclude)
        self.validate()

    def validate(self) -> None:
        if self.preset not in PRESETS and self.preset != "none":
            raise UserInputError(
                f"Unknown target preset '{self.preset}': choose one of {', '.join(PRESETS)} or "
                "'none' (only the include patterns)."
            )
        self.include_patterns()
        self.exclude_patterns()

    def include_patterns(self) -> list[re.Pattern]:
        return _compile(self.include, "include")

    def exclude_patterns(self) -> list[re.Pattern]:
        return _compile(self.exclude, "exclude")


def _compile(patterns: list[str], which: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise UserInputError(
                f"The {which} pattern {pattern!r} is not a valid regular expression ({error}). "
                "Fix the pattern, e.g. 'attn1\\.to_q' or 'single_blocks\\.(1|2)\\.'."
            ) from None
    return compiled


def find_targets(model: nn.Module, spec: TargetSpec) -> dict[str, nn.Module]:
    """Layers that get adapters, by dotted name, in model order."""
    excluded = spec.exclude_patterns()
    included = spec.include_patterns()
    preset = PRESETS.get(spec.preset)
    found = {}
    for name, module in model.named_modules():
        if not name or not adaptable(module):
            continue
        if any(p.search(name) for p in excluded):
            continue
        in_preset = preset is not None and preset.search(name) and not _NOT_BY_DEFAULT.search(name)
        if in_preset or any(p.search(name) for p in included):
            found[name] = module
    return found


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES)


def find_norms(model: nn.Module, spec: TargetSpec) -> dict[str, nn.Module]:
    """Norm layers with an affine weight whose names pass the exclude patterns.

    Norms are few and tiny, so when the user asks for them every norm trains (not only those
    inside the preset's layers); exclude patterns still remove them.
    """
    if not spec.train_norms_and_biases:
        return {}
    excluded = spec.exclude_patterns()
    return {
        name: module
        for name, module in model.named_modules()
        if name
        and is_norm(module)
        and getattr(module, "weight", None) is not None
        and not any(p.search(name) for p in excluded)
    }
