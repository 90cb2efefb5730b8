"""The interface every algorithm implements, and the additive-bypass skeleton they share.

ComfyUI's weight adapters describe bypass as output = g(f(x) + h(x)): LoRA, LoHa and LoKr add a
term h(x) computed from the input; OFT leaves h = 0 and transforms the output. `Adapter` exposes
the three uses of one definition: trainable parameters (the module's Parameters), the weight
delta (merge and save) and the bypass output (training on weights that must not be touched).
"""

from __future__ import annotations

import torch
from torch import nn

from .geometry import LayerGeometry


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Deltas are formed in float32 (float64 stays float64), like ComfyUI's intermediate dtype.
    Written out because torch cannot promote float8 types."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


class Adapter(nn.Module):
    algorithm: str = ""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """dW with the shape of base_weight, in float32 (or wider)."""
        raise NotImplementedError

    def bypass_output(
        self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module, strength: float
    ) -> torch.Tensor:
        return self.bypass_with_geometry(x, base_out, LayerGeometry.of(layer), _bias_of(layer), strength)

    def bypass_with_geometry(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        geometry: LayerGeometry,
        bias: torch.Tensor | None,
        strength: float,
    ) -> torch.Tensor:
        """bypass_output with the layer already read, so hooks read it once, not every step."""
        return base_out + self.bypass_delta(x, geometry, strength).to(base_out)

    def bypass_delta(self, x: torch.Tensor, geometry: LayerGeometry, strength: float) -> torch.Tensor:
        """h(x) * strength for the additive algorithms, computed in x's dtype."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def implied_weight_shape(self) -> tuple[int, ...]:
        """The base weight shape this adapter's tensors imply, with the input side flattened
        unless the tensors carry the kernel (then the full conv shape)."""
        raise NotImplementedError

    def fits(self, geometry: LayerGeometry) -> bool:
        implied = self.implied_weight_shape()
        if len(implied) == 2:
            return implied == (geometry.out_channels, geometry.flat_in)
        return implied == geometry.weight_shape

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def _bias_of(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None
