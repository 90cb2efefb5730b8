"""The LORA_MODEL value passed between nodes: a plain dict of tensors plus two riders.

ComfyUI's own nodes (Save LoRA, Load LoRA Model) treat LORA_MODEL as `dict[str, Tensor]` keyed
with ComfyUI-internal names (`diffusion_model.<module>.lora_up.weight`, `<module>.alpha`,
`<module>.diff_b`...). `LoraModel` *is* such a dict, so core nodes take ours unchanged; what only
our nodes need (file metadata, optimizer state for resume, the kohya-ss names of the model's
layers) rides along as instance attributes
that core code never looks at. A core-made plain dict is accepted everywhere through
`as_lora_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UserInputError
from .keys import KohyaNaming


class LoraModel(dict):
    """`dict[str, Tensor]` with ComfyUI-internal keys, plus `metadata` and `optimizer_state`."""

    metadata: dict[str, Any]
    """Training facts for the file header: algorithm, rank, alpha, steps, base model, settings, loss."""
    optimizer_state: dict[str, Any] | None
    """Optimizer state for resuming (written as a sidecar file), or None."""
    kohya_naming: KohyaNaming | None
    """How kohya-ss names the trained model's layers (for Save LoRA Weights' kohya export), or None."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
        optimizer_state: dict[str, Any] | None = None,
        kohya_naming: KohyaNaming | None = None,
    ):
        super().__init__(tensors or {})
        self.metadata = dict(metadata or {})
        self.optimizer_state = optimizer_state
        self.kohya_naming = kohya_naming

    def tensors(self) -> dict[str, torch.Tensor]:
        """A plain dict copy (what gets written to the file)."""
        return dict(self)

    def __reduce__(self):
        # Keep the riders through pickling / deepcopy (ComfyUI caches may copy outputs).
        return (type(self), (dict(self), self.metadata, self.optimizer_state, self.kohya_naming))


def as_lora_model(value: Any, where: str = "lora") -> LoraModel:
    """Our `LoraModel` for any LORA_MODEL value, including a plain dict made by ComfyUI's trainer."""
    if isinstance(value, LoraModel):
        return value
    if not isinstance(value, Mapping):
        raise UserInputError(
            f"The {where} input is a {type(value).__name__}, not LoRA weights: connect the 'lora' output "
            f"of Train LoRA (or ComfyUI's Train LoRA) to it."
        )
    bad = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserInputError(
            f"The {where} input holds non-tensor entries ({', '.join(map(str, bad[:3]))}): connect the "
            f"'lora' output of a LoRA training node."
        )
    return LoraModel(value)
