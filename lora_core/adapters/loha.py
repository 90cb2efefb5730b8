"""LoHa (FedPara, Hyeon-Woo et al. 2021, https://arxiv.org/abs/2108.06098):
dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise product of two low-rank matrices.

Bypass without forming dW uses the face-splitting identity
(A1 B1) o (A2 B2) = (A1 *r A2)(B1 *r B2), where *r is the row-wise Khatri-Rao product on the out
side and its transpose on the in side: a rank r^2 factorisation, so the bypass is two thin
matmuls (conv: a conv with r^2 channels then a 1x1). When r^2 is so large that the factors cost
more than the full matrix, the bypass forms dW instead; both give the same output.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, compute_dtype, scalar
from .geometry import LayerGeometry


def khatri_rao_factors(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of rank r1*r2 with up @ down == (w1_a @ w1_b) * (w2_a @ w2_b)."""
    up = (w1_a.unsqueeze(2) * w2_a.unsqueeze(1)).reshape(w1_a.shape[0], -1)
    down = (w1_b.unsqueeze(1) * w2_b.unsqueeze(0)).reshape(-1, w1_b.shape[1])
    return up, down


class LoHa(Adapter):
    algorithm = "loha"

    def __init__(self, w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, alpha: float) -> None:
        super().__init__(alpha)
        self.hada_w1_a = nn.Parameter(w1_a)
        self.hada_w1_b = nn.Parameter(w1_b)
        self.hada_w2_a = nn.Parameter(w2_a)
        self.hada_w2_b = nn.Parameter(w2_b)

    @classmethod
    def create(cls, geometry: LayerGeometry, rank: int, alpha: float, generator: torch.Generator, dtype: torch.dtype) -> "LoHa":
        # LyCORIS init: w2_a zero makes the product zero (identity); the other factors random so
        # gradients reach every factor from the first step.
        def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=generator, device=generator.device) * std).to(dtype)

        out, flat_in = geometry.out_channels, geometry.flat_in
        w1_a = normal((out, rank), 0.1)
        w1_b = normal((rank, flat_in), 1.0)
        w2_b = normal((rank, flat_in), 1.0)
        w2_a = torch.zeros((out, rank), dtype=dtype, device=w1_a.device)
        return cls(w1_a, w1_b, w2_a, w2_b, alpha)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LoHa":
        w1_b = tensors["hada_w1_b"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(w1_b.shape[0])
        return cls(
            tensors["hada_w1_a"].clone(), w1_b.clone(), tensors["hada_w2_a"].clone(), tensors["hada_w2_b"].clone(), alpha
        )

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _factors(self, like: torch.dtype | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four factors as matrices, cast to a dtype or to a tensor's dtype and device."""
        return tuple(
            w.reshape(w.shape[0], -1).to(like)
            for w in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        )

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        w1_a, w1_b, w2_a, w2_b = self._factors(compute_dtype(self.hada_w1_a.dtype))
        return (self.scale * (w1_a @ w1_b) * (w2_a @ w2_b)).reshape(base_weight.shape)

    def bypass_delta(self, x: torch.Tensor, geometry: LayerGeometry, strength: float) -> torch.Tensor:
        w1_a, w1_b, w2_a, w2_b = self._factors(x)
        out, flat_in = w1_a.shape[0], w1_b.shape[1]
        inner = w1_a.shape[1] * w2_a.shape[1]
        scale = self.scale * strength
        if inner * (out + flat_in) >= out * flat_in:
            return geometry.dense_output(x, (w1_a @ w1_b) * (w2_a @ w2_b) * scale)
        up, down = khatri_rao_factors(w1_a * scale, w1_b, w2_a, w2_b)
        return geometry.factored_output(x, down, up)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "hada_w1_a": self.hada_w1_a,
            "hada_w1_b": self.hada_w1_b,
            "hada_w2_a": self.hada_w2_a,
            "hada_w2_b": self.hada_w2_b,
            "alpha": scalar(self.alpha),
        }

    def implied_weight_shape(self) -> tuple[int, ...]:
        return (self.hada_w1_a.shape[0], self.hada_w1_b.reshape(self.rank, -1).shape[1])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
