"""Adapters on slices of one layer's output: a diffusers Flux / SD3 LoRA trains `to_q`, `to_k` and
`to_v` separately, while ComfyUI's model computes them in one fused `qkv` Linear.

Each part is an ordinary adapter for the rows [offset, offset + size) of the fused weight, so
its delta is its own delta placed in those rows (what ComfyUI's loader does with a key-map entry
`(weight, (0, offset, size))`), and its bypass is its own bypass on that slice of the output.
The parts keep the names they had in the file, since only those names say which slice they are:
`to_state_dict` writes them back under those names, which ComfyUI's loader and ours map again.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import Adapter
from .geometry import LayerGeometry


@dataclasses.dataclass(frozen=True)
class Slice:
    """Rows [offset, offset + size) of the output of layer `module`."""

    module: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class SlicedAdapter(Adapter):
    def __init__(self, parts: list[tuple[str, Slice, Adapter]]) -> None:
        parts = sorted(parts, key=lambda part: part[1].offset)
        super().__init__(parts[0][2].alpha)
        self.source_names = [name for name, _, _ in parts]
        self.slices = [where for _, where, _ in parts]
        self.parts = nn.ModuleList([adapter for _, _, adapter in parts])
        self.algorithm = parts[0][2].algorithm

    def part_items(self) -> list[tuple[str, Slice, Adapter]]:
        return list(zip(self.source_names, self.slices, self.parts))

    def _pieces(self, total: int, piece) -> list[torch.Tensor]:
        """[untouched, part, untouched, part, ...] along dim 0 of a (total, ...) tensor."""
        pieces, at = [], 0
        for where, adapter in zip(self.slices, self.parts):
            if where.offset > at:
                pieces.append(piece(None, at, where.offset))
            pieces.append(piece(adapter, where.offset, where.end))
            at = where.end
        if at < total:
            pieces.append(piece(None, at, total))
        return pieces

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        def piece(adapter, start, end):
            rows = base_weight[start:end]
            if adapter is None:
                return torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
            return adapter.delta_weight(rows).float()

        return torch.cat(self._pieces(base_weight.shape[0], piece), dim=0)

    def bypass_with_geometry(self, x, base_out, geometry: LayerGeometry, bias, strength: float) -> torch.Tensor:
        channel_dim = 1 if geometry.is_conv else base_out.dim() - 1

        def piece(adapter, start, end):
            out = base_out.narrow(channel_dim, start, end - start)
            if adapter is None:
                return out
            part_geometry = dataclasses.replace(geometry, out_channels=end - start)
            part_bias = bias[start:end] if bias is not None else None
            return adapter.bypass_with_geometry(x, out, part_geometry, part_bias, strength)

        return torch.cat(self._pieces(geometry.out_channels, piece), dim=channel_dim)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        raise TypeError("A SlicedAdapter is written part by part under its source names (AdapterSet.to_state_dict).")

    def fits(self, geometry: LayerGeometry) -> bool:
        at = 0
        for where, adapter in zip(self.slices, self.parts):
            if where.offset < at or where.end > geometry.out_channels:
                return False
            if not adapter.fits(dataclasses.replace(geometry, out_channels=where.size)):
                return False
            at = where.end
        return True

    def implied_weight_shape(self) -> tuple[int, ...]:
        return (self.slices[-1].end, *self.parts[-1].implied_weight_shape()[1:])

    def extra_repr(self) -> str:
        return ", ".join(f"{name}->[{w.offset}:{w.end}]" for name, w in zip(self.source_names, self.slices))
