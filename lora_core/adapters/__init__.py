"""The adapters and how they sit on a model: the four algorithms, which layers they target, how they attach.

Entry points: `create_adapter` / `adapter_from_tensors` (here), `targets.TargetSpec`, `adapter_set.AdapterSet`,
`attach.attach_bypass` / `attach.attach_merged`. Each algorithm module (lora, loha, lokr, oft) defines its
math once; the suffixes below are the LyCORIS / kohya names ComfyUI's loader reads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserInputError
from .base import Adapter
from .geometry import LayerGeometry, adaptable, conv_dims, linear_like
from .loha import LoHa
from .lokr import LoKr, factorization
from .lora import LoRA
from .oft import OFT, block_layout
from .spec import ALGORITHMS, AdapterSpec

__all__ = [
    "ALGORITHMS",
    "Adapter",
    "AdapterSpec",
    "LayerGeometry",
    "LoHa",
    "LoKr",
    "LoRA",
    "OFT",
    "adaptable",
    "adapter_from_tensors",
    "algorithm_of",
    "block_layout",
    "conv_dims",
    "create_adapter",
    "factorization",
    "linear_like",
    "SUFFIXES",
    "UNSUPPORTED_SUFFIXES",
]

# Tensor suffixes of each algorithm, as in kohya-ss / LyCORIS files and ComfyUI's loader.
SUFFIXES = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "oft": ("oft_blocks",),
}
# Variants ComfyUI can apply but this pack cannot train or bypass; named so errors can say so.
UNSUPPORTED_SUFFIXES = {
    "lora_mid.weight": "LoCon Tucker (lora_mid)",
    "hada_t1": "LoHa Tucker (hada_t1/hada_t2)",
    "hada_t2": "LoHa Tucker (hada_t1/hada_t2)",
    "lokr_t2": "LoKr Tucker (lokr_t2)",
    "dora_scale": "DoRA (dora_scale)",
    "rescale": "OFT rescale",
    "reshape_weight": "reshaped LoRA (reshape_weight)",
}


def create_adapter(
    spec: AdapterSpec, layer: nn.Module, generator: torch.Generator, dtype: torch.dtype = torch.float32, name: str = ""
) -> Adapter:
    """A fresh adapter for layer: an exact identity whose random parts come from generator only."""
    spec.validate()
    geometry = LayerGeometry.of(layer, name)
    if spec.algorithm == "lora":
        return LoRA.create(geometry, spec.rank, spec.alpha, generator, dtype)
    if spec.algorithm == "loha":
        return LoHa.create(geometry, spec.rank, spec.alpha, generator, dtype)
    if spec.algorithm == "lokr":
        return LoKr.create(geometry, spec.rank, spec.alpha, spec.lokr_factor, generator, dtype)
    return OFT.create(geometry, spec.oft_block_size, spec.alpha, dtype, generator.device, name)


def algorithm_of(tensors: dict[str, torch.Tensor], where: str = "") -> str:
    """Which algorithm a module's tensors belong to, or a UserInputError saying why none fits."""
    place = f" for '{where}'" if where else ""
    for suffix, what in UNSUPPORTED_SUFFIXES.items():
        if suffix in tensors:
            raise UserInputError(
                f"The LoRA tensors{place} use {what}, which this pack cannot apply in its loader or "
                "train from. Load this file with ComfyUI's core LoraLoader instead."
            )
    found = [algorithm for algorithm, suffixes in SUFFIXES.items() if any(s in tensors for s in suffixes)]
    if len(found) != 1:
        keys = ", ".join(sorted(tensors))
        problem = "mixes tensors of " + " and ".join(found) if found else "has no adapter tensors"
        raise UserInputError(
            f"The LoRA tensors{place} {problem} (keys: {keys}). Each module needs exactly one of "
            "lora_up/lora_down, hada_*, lokr_* or oft_blocks."
        )
    algorithm = found[0]
    missing = _missing_parts(algorithm, tensors)
    if missing:
        raise UserInputError(
            f"The {algorithm} tensors{place} lack {', '.join(missing)}; the file is incomplete. "
            "Re-export it or use another file."
        )
    return algorithm


def adapter_from_tensors(tensors: dict[str, torch.Tensor], layer: nn.Module | None = None, name: str = "") -> Adapter:
    """Rebuild an adapter from suffix -> tensor; with a layer, check it fits that layer's shape."""
    algorithm = algorithm_of(tensors, name)
    builders = {"lora": LoRA, "loha": LoHa, "lokr": LoKr, "oft": OFT}
    # float8 files (some trainers save those) cannot be multiplied; widen them once here.
    tensors = {k: v.float() if v.dtype in _FLOAT8 else v for k, v in tensors.items()}
    adapter = builders[algorithm].from_tensors(tensors)
    if layer is not None:
        geometry = LayerGeometry.of(layer, name)
        if not adapter.fits(geometry):
            raise UserInputError(
                f"The {algorithm} tensors for '{name or type(layer).__name__}' imply a weight of shape "
                f"{tuple(adapter.implied_weight_shape())}, but the model's layer has shape "
                f"{tuple(geometry.weight_shape)}. The LoRA was made for a different model; pick a "
                "LoRA trained on this base model."
            )
    return adapter


_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def _missing_parts(algorithm: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    if algorithm == "lora":
        return [s for s in SUFFIXES["lora"] if s not in tensors]
    if algorithm == "loha":
        return [s for s in SUFFIXES["loha"] if s not in tensors]
    if algorithm == "oft":
        blocks = tensors["oft_blocks"]
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            return ["oft_blocks of shape (blocks, size, size)"]
        return []
    missing = []
    if "lokr_w1" not in tensors and not ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors):
        missing.append("lokr_w1 (or lokr_w1_a + lokr_w1_b)")
    if "lokr_w2" not in tensors and not ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors):
        missing.append("lokr_w2 (or lokr_w2_a + lokr_w2_b)")
    return missing
