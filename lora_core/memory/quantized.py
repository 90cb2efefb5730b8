"""Training on quantized base models (float8, FP4, int-packed): what works and what to tell the user.

A weight stored in float8 (or packed in a tensor subclass such as ComfyUI's `QuantizedTensor`) is
cast to the compute dtype inside the layer's forward. Bypass adapters never read or write it, so
such models train with `bypass_mode` on and `training_dtype none` (the layers compute in their own
compute dtype). Merging cannot work: W + dW rounded back to float8 loses an adapter's small
change (and a packed tensor cannot be written at all), so a merge-mode run is refused up front.

FP8 backward (ComfyUI's `training_fp8_bwd`) runs the backward matmuls of quantized layers on FP8
tensor cores; it needs CUDA compute capability 8.9+ and `torch._scaled_mm`. Elsewhere training
still works with the dequantized backward, and the user gets a warning saying so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserInputError
from .offload import check_offloading

__all__ = [
    "LowVramCheck",
    "check_low_vram_settings",
    "fp8_backward_support",
    "is_packed",
    "quantized_parameters",
    "require_bypass_for_quantized",
]

PLAIN_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP8_BACKWARD_FALLBACK = "quantized_backward needs an FP8-capable CUDA GPU; using dequantized backward"


def is_packed(tensor: torch.Tensor) -> bool:
    """A tensor subclass holding quantized data (ComfyUI QuantizedTensor, GGUF tensors, ...).
    Parameter subclasses (ComfyUI's lazy-casting params) are plain storage underneath."""
    kind = type(tensor)
    return kind is not torch.Tensor and not issubclass(kind, nn.Parameter)


def describe_storage(tensor: torch.Tensor) -> str | None:
    """None for a plain float tensor, else what it is stored as ("float8_e4m3fn", "QuantizedTensor")."""
    if is_packed(tensor):
        return type(tensor).__name__
    if tensor.dtype not in PLAIN_FLOAT_DTYPES:
        return str(tensor.dtype).removeprefix("torch.")
    return None


def quantized_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter name -> storage description, for every parameter not stored as a plain float."""
    found = {}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        storage = describe_storage(parameter)
        if storage is not None:
            found[name] = storage
    return found


def _summary(found: dict[str, str]) -> str:
    kinds = ", ".join(f"{count} as {kind}" for kind, count in Counter(found.values()).most_common())
    return f"{len(found)} weights are stored quantized ({kinds}; e.g. '{next(iter(found))}')"


def require_bypass_for_quantized(model: nn.Module, bypass: bool) -> None:
    """Refuse merge mode on a model with quantized weights, naming them."""
    if bypass:
        return
    found = quantized_parameters(model)
    if found:
        raise UserInputError(
            f"quantized model needs bypass_mode: {_summary(found)}, and W + dW cannot be stored back "
            "in that format without losing the adapter. Turn bypass_mode on (and set training_dtype "
            "to none); load the result with Load LoRA Model in bypass mode too."
        )


def fp8_backward_support(device: torch.device | str) -> tuple[bool, str | None]:
    """(True, None) when FP8 backward can run on `device`, else (False, the warning to show)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"{FP8_BACKWARD_FALLBACK} (training runs on {device.type})."
    if not hasattr(torch, "_scaled_mm"):
        return False, f"{FP8_BACKWARD_FALLBACK} (this torch build has no torch._scaled_mm)."
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (
            f"{FP8_BACKWARD_FALLBACK} ({name} is compute capability {major}.{minor}; FP8 needs 8.9+, "
            "e.g. RTX 40xx, H100)."
        )
    return True, None


@dataclass
class LowVramCheck:
    """What the low-VRAM settings resolve to: whether to switch FP8 backward on, and warnings."""

    fp8_backward: bool = False
    quantized: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_low_vram_settings(
    model: nn.Module,
    *,
    device: torch.device | str,
    bypass: bool,
    training_dtype: str,
    gradient_checkpointing: bool,
    offloading: bool,
    quantized_backward: bool,
) -> LowVramCheck:
    """Raise UserInputError for combinations that cannot work; return warnings for ones that
    work differently than asked."""
    check_offloading(offloading, gradient_checkpointing)
    require_bypass_for_quantized(model, bypass)
    result = LowVramCheck(quantized=quantized_parameters(model))
    if result.quantized and training_dtype != "none":
        result.warnings.append(
            f"training_dtype {training_dtype} on a quantized model: {_summary(result.quantized)}. Autocast "
            "adds a cast around every quantized layer; training_dtype none lets the layers compute in "
            "their own compute dtype and is the tested setting."
        )
    if quantized_backward:
        if not result.quantized:
            result.warnings.append(
                "quantized_backward has no effect: this model has no quantized weights (it applies to "
                "models loaded in FP8/FP4 formats)."
            )
        elif not any(is_packed(p) for p in model.parameters()):
            result.warnings.append(
                "quantized_backward has no effect on this model: its weights are plain float8, "
                "cast to the compute dtype in each layer's forward. FP8 backward applies to models "
                "whose file carries quantization (scaled FP8 / NVFP4 checkpoints)."
            )
        else:
            result.fp8_backward, message = fp8_backward_support(device)
            if message is not None:
                result.warnings.append(message)
    return result
