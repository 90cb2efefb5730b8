"""The shape and convolution settings of a layer, read from its attributes, never from its weight.

Bypass training exists for models whose weights are quantized, offloaded or lazily created
(ComfyUI's cast layers keep `weight` in float8 or as `None` until loaded), so everything an
adapter needs to know about its layer comes from `in_features` / `out_features` or the conv
attributes. The one place a weight is read is OFT's merge, which rotates it by definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserInputError

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def linear_like(module: nn.Module) -> bool:
    """nn.Linear and its subclasses, plus ComfyUI's quantized mixed-precision Linear, which is a
    plain nn.Module named Linear with in_features/out_features."""
    if isinstance(module, nn.Linear):
        return True
    return (
        type(module).__name__ == "Linear"
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


def conv_dims(module: nn.Module) -> int:
    """1, 2 or 3 for Conv1d/2d/3d (and subclasses), 0 otherwise."""
    for conv_type, dims in _CONV_TYPES.items():
        if isinstance(module, conv_type):
            return dims
    return 0


def adaptable(module: nn.Module) -> bool:
    return linear_like(module) or conv_dims(module) > 0


@dataclass(frozen=True)
class LayerGeometry:
    """What the adapter math needs to know about a Linear or ConvNd layer."""

    out_channels: int
    in_channels: int  # per group for convs: the weight's second dimension
    kernel_size: tuple[int, ...] = ()  # empty for Linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()  # F.pad order, used when padding_mode is not "zeros"

    @classmethod
    def of(cls, layer: nn.Module, name: str = "") -> "LayerGeometry":
        if linear_like(layer):
            return cls(out_channels=int(layer.out_features), in_channels=int(layer.in_features))
        dims = conv_dims(layer)
        if dims == 0:
            where = f" '{name}'" if name else ""
            raise UserInputError(
                f"Layer{where} is a {type(layer).__name__}; adapters attach only to Linear and "
                "Conv1d/2d/3d layers. Exclude it from the target layers."
            )
        return cls(
            out_channels=int(layer.out_channels),
            in_channels=int(layer.in_channels) // int(layer.groups),
            kernel_size=tuple(layer.kernel_size),
            stride=tuple(layer.stride),
            padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
            dilation=tuple(layer.dilation),
            groups=int(layer.groups),
            padding_mode=str(layer.padding_mode),
            reversed_padding=tuple(getattr(layer, "_reversed_padding_repeated_twice", ())),
        )

    @property
    def is_conv(self) -> bool:
        return len(self.kernel_size) > 0

    @property
    def conv_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def flat_in(self) -> int:
        """Columns of the weight seen as a matrix: in_channels x kernel elements."""
        return self.in_channels * math.prod(self.kernel_size)

    @property
    def ones(self) -> tuple[int, ...]:
        """Trailing singleton kernel dims of a 1x1 conv weight."""
        return (1,) * self.conv_dims

    def conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        """Convolve with the layer's kernel settings (stride, padding, dilation, padding mode)."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            padding = 0
        return _CONV_FUNCTIONS[self.conv_dims](
            x, weight, None, self.stride, padding, self.dilation, self.groups if groups is None else groups
        )

    def pointwise(self, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """A 1x1 conv along the channel dimension (weight given as out x in matrix)."""
        return _CONV_FUNCTIONS[self.conv_dims](x, weight.reshape(*weight.shape, *self.ones), None, 1, 0, 1, groups)

    def factored_output(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """up(down(x)) for dW = up @ down, without forming dW.

        down: (rank, flat_in), up: (out, rank). For a grouped conv each output group sees only its
        own input channels, so down is repeated once per group and up is applied group-wise.
        """
        rank = down.shape[0]
        if not self.is_conv:
            return F.linear(F.linear(x, down), up)
        down_conv = down.reshape(rank, self.in_channels, *self.kernel_size)
        if self.groups > 1:
            down_conv = down_conv.repeat(self.groups, *([1] * (down_conv.dim() - 1)))
            hidden = self.conv(x, down_conv)
            return self.pointwise(hidden, up, groups=self.groups)
        return self.pointwise(self.conv(x, down_conv), up)

    def dense_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x through a full weight delta (used only where that is cheaper than the factors)."""
        if not self.is_conv:
            return F.linear(x, delta.reshape(self.out_channels, self.flat_in))
        return self.conv(x, delta.reshape(self.weight_shape))
