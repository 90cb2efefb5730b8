"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): dW = (alpha / rank) * up @ down.

For convs, down is a conv with the layer's kernel, stride, padding and dilation and up a 1x1
conv (LoCon), so the file holds down as (rank, in, *kernel) and up as (out, rank, 1, ...), the
kohya-ss / LyCORIS layout ComfyUI's loader flattens back to matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, compute_dtype, scalar
from .geometry import LayerGeometry


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) drawn from our generator, so the seed fixes the init."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in)
    values = torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return ((values * 2.0 - 1.0) * bound).to(dtype)


class LoRA(Adapter):
    algorithm = "lora"

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float) -> None:
        super().__init__(alpha)
        self.up = nn.Parameter(up)
        self.down = nn.Parameter(down)

    @classmethod
    def create(cls, geometry: LayerGeometry, rank: int, alpha: float, generator: torch.Generator, dtype: torch.dtype) -> "LoRA":
        # kohya / PEFT init: down random, up zero, so the first step starts from the base model.
        down = kaiming_uniform((rank, geometry.in_channels, *geometry.kernel_size), generator, dtype)
        up = torch.zeros((geometry.out_channels, rank, *geometry.ones), dtype=dtype, device=down.device)
        return cls(up, down, alpha)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LoRA":
        up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        return cls(up.clone(), down.clone(), alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.up.dtype)
        up = self.up.reshape(self.up.shape[0], -1).to(dtype)
        down = self.down.reshape(self.rank, -1).to(dtype)
        return (self.scale * (up @ down)).reshape(base_weight.shape)

    def bypass_delta(self, x: torch.Tensor, geometry: LayerGeometry, strength: float) -> torch.Tensor:
        # .to(x): x's dtype and device, so fp32 (or CPU-held) parameters meet bf16 GPU activations
        down = self.down.reshape(self.rank, -1).to(x)
        # The scale goes on the thin factor: rank x in multiplications instead of out x tokens.
        up = (self.up.reshape(self.up.shape[0], -1) * (self.scale * strength)).to(x)
        return geometry.factored_output(x, down, up)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_up.weight": self.up, "lora_down.weight": self.down, "alpha": scalar(self.alpha)}

    def implied_weight_shape(self) -> tuple[int, ...]:
        if self.down.dim() > 2:
            return (self.up.shape[0], *self.down.shape[1:])
        return (self.up.shape[0], self.down.shape[1])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
