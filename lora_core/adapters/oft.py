"""OFT (Qiu et al. 2023, https://arxiv.org/abs/2306.07280): rotate the output channels of a layer
by a block-diagonal orthogonal matrix R built from skew-symmetric blocks by the Cayley transform.

Semantics follow ComfyUI's loader: Q = B - B^T; with constraint alpha > 0 and ||Q|| + 1e-8 >
alpha, Q is scaled to norm alpha; R = (I + Q)(I - Q)^-1; the merged weight of block k is
einsum("k n m, k n ... -> k m ...", R, W_k), and strength s blends R with I. The bias is not
rotated, so the bypass rotates (base_out - bias) and leaves the bias as it was.

The constraint means what ComfyUI's loader makes of a file's `alpha`: ||Q|| <= alpha. LyCORIS
reads the same number as ||Q|| <= alpha * out_channels; `lorafile.keys` converts LyCORIS files on
reading and our files record the convention in their metadata.

We compute R - I = 2 Q (I - Q)^-1 rather than R and then subtract I: it is exactly zero for a
fresh adapter (an exact identity in both modes) and loses no digits when Q is small.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserInputError
from .base import Adapter, scalar
from .geometry import LayerGeometry
from .lokr import factorization


def block_layout(out_channels: int, factor: int, where: str = "") -> tuple[int, int]:
    """(block count, block size) for out_channels, the way LyCORIS and ComfyUI's trainer lay
    OFT out: `block_size, block_count = factorization(out_channels, factor)` with the user's
    oft_block_size as the factor (their `dim` / `rank`). The block size is the smaller factor, so
    it never exceeds the block count; LyCORIS rebuilds exactly this layout from a file's block
    size, which is what lets it load our files."""
    size, count = factorization(out_channels, factor)
    if size < 2:
        place = f" of layer '{where}'" if where else ""
        raise UserInputError(
            f"OFT cannot split the {out_channels} output channels{place} into blocks: {out_channels} "
            f"has no factor pair near oft_block_size {factor}. Exclude this layer from the targets "
            "or change oft_block_size."
        )
    return count, size


class OFT(Adapter):
    algorithm = "oft"

    def __init__(self, blocks: torch.Tensor, alpha: float) -> None:
        super().__init__(alpha)
        self.oft_blocks = nn.Parameter(blocks)

    @classmethod
    def create(cls, geometry: LayerGeometry, block_size: int, alpha: float, dtype: torch.dtype, device: torch.device, where: str = "") -> "OFT":
        # Blocks must not straddle conv groups: rotating the weights of another group's output
        # channel would no longer equal rotating the layer's output.
        count, size = block_layout(geometry.out_channels // geometry.groups, block_size, where)
        blocks = torch.zeros((count * geometry.groups, size, size), dtype=dtype, device=device)
        return cls(blocks, alpha)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "OFT":
        alpha = float(tensors["alpha"]) if "alpha" in tensors else 0.0
        return cls(tensors["oft_blocks"].clone(), alpha)

    @property
    def block_count(self) -> int:
        return self.oft_blocks.shape[0]

    @property
    def block_size(self) -> int:
        return self.oft_blocks.shape[1]

    def rotation_minus_identity(self) -> torch.Tensor:
        """R - I per block, float32 (linalg.solve needs it), shape (blocks, b, b)."""
        blocks = self.oft_blocks.float()
        q = blocks - blocks.transpose(1, 2)
        if self.alpha > 0:
            q_norm = torch.linalg.norm(q) + 1e-8
            # torch.where instead of `if`: no device sync, same numbers as ComfyUI's branch.
            q = torch.where(q_norm > self.alpha, q * self.alpha / q_norm, q)
        identity = torch.eye(self.block_size, device=q.device, dtype=q.dtype)
        return 2.0 * torch.linalg.solve(identity - q, q, left=False)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation_minus_identity()
        blocked = base_weight.to(device=rotation.device, dtype=rotation.dtype).reshape(self.block_count, self.block_size, *base_weight.shape[1:])
        return torch.einsum("k n m, k n ... -> k m ...", rotation, blocked).reshape(base_weight.shape)

    def bypass_with_geometry(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        geometry: LayerGeometry,
        bias: torch.Tensor | None,
        strength: float,
    ) -> torch.Tensor:
        rotation = (self.rotation_minus_identity() * strength).to(base_out)
        unbiased = base_out
        channel_dim = 1 if geometry.is_conv else -1
        if bias is not None:
            shape = [1] * base_out.dim()
            shape[channel_dim] = -1
            unbiased = base_out - bias.to(device=base_out.device, dtype=base_out.dtype).reshape(shape)
        channels_last = unbiased.movedim(channel_dim, -1)
        blocked = channels_last.reshape(*channels_last.shape[:-1], self.block_count, self.block_size)
        rotated = torch.einsum("k n m, ... k n -> ... k m", rotation, blocked)
        delta = rotated.reshape(channels_last.shape).movedim(-1, channel_dim)
        return base_out + delta

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_blocks": self.oft_blocks, "alpha": scalar(self.alpha)}

    def implied_weight_shape(self) -> tuple[int, ...]:
        return (self.block_count * self.block_size,)

    def fits(self, geometry: LayerGeometry) -> bool:
        per_group = geometry.out_channels // geometry.groups
        return geometry.out_channels == self.block_count * self.block_size and per_group % self.block_size == 0

    def extra_repr(self) -> str:
        return f"blocks={self.block_count}x{self.block_size}, constraint={self.alpha}"
