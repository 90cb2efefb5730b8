"""Which layers of a model get adapters, and which norms / biases get trained deltas.

A layer is a candidate by kind (Linear or Conv1d/2d/3d, subclasses included, so ComfyUI's cast
layers count) and then by its dotted name: a preset picks the usual layers of diffusion
transformers and UNets, `include` patterns add layers, `exclude` patterns remove them
(`re.search` on the dotted name, exclude wins). The presets were checked against ComfyUI's
SD1.5/SDXL UNet (attn1/attn2.to_q/k/v/to_out.0, ff.net.0.proj, ff.net.2, proj_in/proj_out),
Flux (img_attn.qkv/proj, img_mlp.0/2, single_blocks.N.linear1/linear2), SD3 MMDiT (attn.qkv/proj,
mlp.fc1/fc2), Wan (self_attn.q/k/v/o, ffn.0/2), Qwen-Image (to_q, add_q_proj, to_add_out,
img_mlp.net.*) and Lumina/Z-Image (attention.qkv/out, feed_forward.w1/w2/w3).
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
# Feed-forward modules and the in/out projections of transformer blocks.
_MLP = (
    r"(^|\.)(ff|ff_in|ffn|mlp|feed_forward|feedforward|[a-z0-9]+_mlp|mlp_[a-z0-9]+|ff_context)\."
    r"|(^|\.)(fc1|fc2|proj_in|proj_out|gate_proj|up_proj|down_proj)$"
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
        if (preset is not None and preset.search(name)) or any(p.search(name) for p in included):
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
