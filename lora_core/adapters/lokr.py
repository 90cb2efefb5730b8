"""LoKr (LyCORIS, Yeh et al. 2023, https://arxiv.org/abs/2309.14859): dW = scale * kron(w1, w2).

The out and in dimensions are each split into two factors (`factorization`, LyCORIS semantics);
w1 (out_m, in_m) is the small full matrix, w2 (out_k, in_n[, kernel]) the large one, itself
low-rank (w2_a @ w2_b) when rank is below half its size. As in ComfyUI's loader the scale is
alpha / rank when a low-rank factor is present and 1 otherwise.

Bypass for Linear uses the Kronecker identity kron(w1, w2) vec(X) = vec(w2 X w1^T) on the input
reshaped to (in_m, in_n): two small matmuls, never the out x in matrix. Convs form dW (it is
the size of the layer's kernel at most) and run the layer's conv with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, compute_dtype, scalar
from .geometry import LayerGeometry
from .lora import kaiming_uniform


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split dimension into (m, n), m <= n, m * n == dimension.

    factor > 0 that divides dimension (and is at most its square root) is used as is; otherwise
    m is the largest divisor reached, counting up, that does not exceed factor (-1: no limit)
    while m stays below n, which gives the most balanced split.
    """
    if factor > 0 and dimension % factor == 0 and dimension >= factor * factor:
        other = dimension // factor
        return min(factor, other), max(factor, other)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate != 0:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


class LoKr(Adapter):
    algorithm = "lokr"

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float) -> None:
        super().__init__(alpha)
        self.w1_parts = tuple(name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b") if name in tensors)
        self.w2_parts = tuple(name for name in ("lokr_w2", "lokr_w2_a", "lokr_w2_b") if name in tensors)
        for name in self.w1_parts + self.w2_parts:
            self.register_parameter(name, nn.Parameter(tensors[name]))

    @classmethod
    def create(
        cls, geometry: LayerGeometry, rank: int, alpha: float, factor: int, generator: torch.Generator, dtype: torch.dtype
    ) -> "LoKr":
        out_m, out_k = factorization(geometry.out_channels, factor)
        in_m, in_n = factorization(geometry.in_channels, factor)
        kernel = geometry.kernel_size
        w1 = kaiming_uniform((out_m, in_m), generator, dtype)
        device = w1.device
        if rank < max(out_k, in_n) / 2:
            w2_a = kaiming_uniform((out_k, rank), generator, dtype)
            w2_b = torch.zeros((rank, in_n * math.prod(kernel)), dtype=dtype, device=device)
            return cls({"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}, alpha)
        # A full w2 keeps its kernel dims only for Conv2d: ComfyUI's loader unsqueezes w1 for 4-D
        # w2 alone, and the flat form means the same for every kernel rank.
        w2_shape = (out_k, in_n, *kernel) if len(kernel) == 2 else (out_k, in_n * math.prod(kernel))
        w2 = torch.zeros(w2_shape, dtype=dtype, device=device)
        return cls({"lokr_w1": w1, "lokr_w2": w2}, alpha)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LoKr":
        parts = {k: v.clone() for k, v in tensors.items() if k.startswith("lokr_")}
        rank = _low_rank(parts)
        if "alpha" in tensors:
            alpha = float(tensors["alpha"])
        else:
            alpha = float(rank) if rank is not None else 1.0
        return cls(parts, alpha)

    @property
    def rank(self) -> int | None:
        return _low_rank({name: getattr(self, name) for name in self.w1_parts + self.w2_parts})

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if rank is not None else 1.0

    def _w1(self, like: torch.dtype | torch.Tensor) -> torch.Tensor:
        if "lokr_w1" in self.w1_parts:
            return self.lokr_w1.to(like)
        return self.lokr_w1_a.to(like) @ self.lokr_w1_b.to(like)

    def _w2(self, like: torch.dtype | torch.Tensor) -> torch.Tensor:
        if "lokr_w2" in self.w2_parts:
            return self.lokr_w2.reshape(self.lokr_w2.shape[0], -1).to(like)
        return self.lokr_w2_a.to(like) @ self.lokr_w2_b.reshape(self.lokr_w2_b.shape[0], -1).to(like)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(next(self.parameters()).dtype)
        return (torch.kron(self._w1(dtype), self._w2(dtype)) * self.scale).reshape(base_weight.shape)

    def bypass_delta(self, x: torch.Tensor, geometry: LayerGeometry, strength: float) -> torch.Tensor:
        # Factors are cast with .to(x): x's dtype and device.
        w1 = self._w1(x) * (self.scale * strength)
        if geometry.is_conv:
            return geometry.dense_output(x, torch.kron(w1, self._w2(x)))
        out_m, in_m = w1.shape
        grouped = x.reshape(*x.shape[:-1], in_m, -1)  # (..., in_m, in_n)
        if "lokr_w2" in self.w2_parts:
            hidden = grouped @ self.lokr_w2.to(x).t()
        else:
            hidden = (grouped @ self.lokr_w2_b.to(x).t()) @ self.lokr_w2_a.to(x).t()
        # hidden: (..., in_m, out_k); mixing over in_m with w1 gives (..., out_m, out_k),
        # already in the row order of kron(w1, w2)'s output.
        mixed = torch.einsum("a b, ... b c -> ... a c", w1, hidden)
        return mixed.reshape(*x.shape[:-1], -1)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(self, name) for name in self.w1_parts + self.w2_parts}
        tensors["alpha"] = scalar(self.alpha)
        return tensors

    def _w1_shape(self) -> tuple[int, int]:
        if "lokr_w1" in self.w1_parts:
            return tuple(self.lokr_w1.shape)
        return (self.lokr_w1_a.shape[0], self.lokr_w1_b.shape[1])

    def implied_weight_shape(self) -> tuple[int, ...]:
        out_m, in_m = self._w1_shape()
        if "lokr_w2" in self.w2_parts:
            w2_shape = tuple(self.lokr_w2.shape)
            if len(w2_shape) > 2:
                return (out_m * w2_shape[0], in_m * w2_shape[1], *w2_shape[2:])
        else:
            w2_shape = (self.lokr_w2_a.shape[0], math.prod(self.lokr_w2_b.shape[1:]))
        return (out_m * w2_shape[0], in_m * w2_shape[1])

    def fits(self, geometry: LayerGeometry) -> bool:
        # The kron splits the input side as (in_m, in_n * kernel): the in factor must divide
        # the layer's input channels, not only the flattened count.
        return super().fits(geometry) and geometry.in_channels % self._w1_shape()[1] == 0

    def extra_repr(self) -> str:
        return f"parts={self.w1_parts + self.w2_parts}, alpha={self.alpha}"


def _low_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank ComfyUI divides alpha by: w2_b's rows if w2 is factored, else w1_b's, else none."""
    if "lokr_w2_b" in parts:
        return parts["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in parts:
        return parts["lokr_w1_b"].shape[0]
    return None

