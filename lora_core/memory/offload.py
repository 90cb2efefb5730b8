"""Block-wise offloading of frozen base weights, for training with block gradient checkpointing.

The frozen weights of each block live on a storage device (the CPU, pinned when the compute device
is CUDA) and only the block being run has a copy on the compute device. A block is loaded when it
is entered, in the forward pass and again when the checkpoint recomputes it in the backward pass,
and released when the next block is loaded or the block's forward ends. Released weights are
shape-only `meta` tensors: they hold no storage, and anything that reads one by mistake fails
loudly instead of computing with stale values.

Why this needs gradient checkpointing: autograd keeps every tensor an op saved for backward, so
without checkpointing each block's compute copy stays alive until the backward pass and nothing
is saved. With checkpointing the forward saves nothing inside a block, and the recompute in the
backward pass saves one block's copies until that block's gradients are done. Each load makes
fresh tensors (never a reused buffer), so what autograd holds can never be overwritten: results
are the same with or without offloading, bit for bit on the same device.

Hooks, not wrappers: a forward pre-hook on every module inside a block loads that block, so the
load also happens when the checkpoint recomputes the block's inner forward (which bypasses the
block's own hooks but calls its sub-modules normally). Only parameters owned by modules *inside*
a block are streamed; parameters owned by the block module itself, everything outside the blocks
(embeddings, input/output layers), buffers and trainable parameters stay on the compute device.

Invariant: `remove()` (also on an exception, including a `BaseException` cancel) puts every
original Parameter and buffer object back, with its original values on its original device.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .checkpointing import find_checkpoint_blocks
from ..errors import UserInputError

__all__ = ["BlockOffloader", "check_offloading"]


def check_offloading(offloading: bool, gradient_checkpointing: bool) -> None:
    """Config validation: offloading only saves memory when blocks are recomputed in backward."""
    if offloading and not gradient_checkpointing:
        raise UserInputError(
            "offloading needs gradient_checkpointing on: without it every block's weights stay on "
            "the GPU until the backward pass, so nothing is saved. Turn gradient_checkpointing on "
            "or turn offloading off."
        )


@dataclass
class _Streamed:
    """One frozen parameter streamed from storage: where it lives and what to put back."""

    owner: nn.Module
    name: str
    original: nn.Parameter
    original_device: torch.device
    store: torch.Tensor  # the values on the storage device
    placeholder: nn.Parameter  # meta, same shape and dtype: what a released block holds
    emptied: bool  # the original's own storage was freed (it sat on another device) and is refilled on removal


@dataclass
class _Moved:
    """A resident parameter or buffer moved to the compute device for the duration."""

    owner: nn.Module
    name: str
    is_buffer: bool
    original: torch.Tensor
    original_data: torch.Tensor


class BlockOffloader:
    """Context manager: only the running block's frozen weights sit on `compute_device`.

    `blocks` are the units to stream (default: the same blocks `GradientCheckpointing(root, depth)`
    wraps); they must not overlap. `stream_resident=False` leaves parameters that already sit on
    the compute device alone, for hosts (ComfyUI's partial loading) that placed some weights on the
    GPU themselves and keep the rest on the CPU. `pin_memory`: None pins the copies this class
    makes (weights that sat on the GPU) and uses CPU weights in place, so no RAM is doubled; True
    pins everything (faster transfers, a second copy of CPU weights).
    """

    def __init__(
        self,
        root: nn.Module,
        compute_device: torch.device | str,
        blocks: Mapping[str, nn.Module] | None = None,
        depth: int = 1,
        storage_device: torch.device | str = "cpu",
        pin_memory: bool | None = None,
        stream_resident: bool = True,
    ):
        self.root = root
        self.compute_device = torch.device(compute_device)
        self.storage_device = torch.device(storage_device)
        self.blocks = dict(blocks) if blocks is not None else find_checkpoint_blocks(root, depth)
        self.pin_memory = pin_memory
        self.stream_resident = stream_resident
        self._streamed: dict[str, list[_Streamed]] = {}
        self._moved: list[_Moved] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._loaded: set[str] = set()
        self.loads = 0  # how many times a block was copied to the compute device (tests, bench)

    # ---- set up and tear down ---------------------------------------------------------------
    def apply(self) -> "BlockOffloader":
        done = False
        try:
            self._check_blocks()
            inside = self._plan_streamed()
            self._move_resident(inside)
            for block_name, block in self.blocks.items():
                self._register_hooks(block_name, block)
            done = True
        finally:
            if not done:
                self.remove()
        return self

    def remove(self) -> None:
        """Put every original tensor back. Idempotent; runs in `finally` of the caller."""
        while self._hooks:
            self._hooks.pop().remove()
        self._loaded.clear()
        with torch.no_grad():
            while self._streamed:
                _, records = self._streamed.popitem()
                for record in records:
                    if record.emptied:
                        record.original.data = record.store.to(record.original_device, copy=True)
                    record.owner._parameters[record.name] = record.original
            while self._moved:
                record = self._moved.pop()
                if record.is_buffer:
                    record.owner._buffers[record.name] = record.original
                else:
                    record.original.data = record.original_data
                    record.owner._parameters[record.name] = record.original

    def __enter__(self) -> "BlockOffloader":
        return self.apply()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # ---- state, for the engine and tests ----------------------------------------------------
    @property
    def loaded_blocks(self) -> set[str]:
        return set(self._loaded)

    def streamed_bytes(self) -> int:
        """Bytes of frozen weights that live on the storage device instead of the compute device."""
        return sum(self.block_bytes().values())

    def block_bytes(self) -> dict[str, int]:
        """Block name -> bytes of its streamed weights (what one load puts on the compute device)."""
        return {
            name: sum(r.store.numel() * r.store.element_size() for r in records)
            for name, records in self._streamed.items()
        }

    def release_all(self) -> None:
        """Drop every compute copy (for example after the backward pass, before validation)."""
        for block_name in list(self._loaded):
            self._release(block_name)

    # ---- internals --------------------------------------------------------------------------
    def _check_blocks(self) -> None:
        if not self.blocks:
            raise UserInputError(
                f"offloading found no blocks to stream in {type(self.root).__name__}: it works on "
                "models made of block lists (UNet, DiT, Flux). Turn offloading off for this model."
            )
        owner_block: dict[int, str] = {}
        for block_name, block in self.blocks.items():
            for module in block.modules():
                if id(module) in owner_block:
                    raise UserInputError(
                        f"offloading blocks '{owner_block[id(module)]}' and '{block_name}' overlap; "
                        "give blocks that do not contain each other (one checkpoint depth)."
                    )
                owner_block[id(module)] = block_name

    def _plan_streamed(self) -> set[int]:
        """Move each block's frozen inner parameters to storage; return the ids of streamed params.

        A parameter held in two places (tied weights) stays resident: swapping one slot would
        leave the other pointing at the original."""
        slots = Counter(id(p) for m in self.root.modules() for p in m._parameters.values() if p is not None)
        inside: set[int] = set()
        with torch.no_grad():
            for block_name, block in self.blocks.items():
                records = self._streamed[block_name] = []  # filled in place: remove() sees partial work
                for module in block.modules():
                    if module is block:
                        continue
                    for name, parameter in list(module._parameters.items()):
                        if parameter is None or parameter.requires_grad or slots[id(parameter)] > 1:
                            continue
                        if not self.stream_resident and parameter.device == self.compute_device:
                            continue
                        inside.add(id(parameter))
                        records.append(self._stream(module, name, parameter))
        return inside

    def _stream(self, owner: nn.Module, name: str, parameter: nn.Parameter) -> _Streamed:
        data = parameter.data
        store = data if data.device == self.storage_device else data.to(self.storage_device, copy=True)
        pin = self.pin_memory if self.pin_memory is not None else store is not data
        if pin and self.storage_device.type == "cpu" and self.compute_device.type == "cuda" and not store.is_pinned():
            store = store.pin_memory()
        placeholder = nn.Parameter(torch.empty(tuple(data.shape), dtype=data.dtype, device="meta"), requires_grad=False)
        emptied = data.device != self.storage_device
        if emptied:
            # The original sat on the compute device: free that copy while offloaded.
            parameter.data = torch.empty(0, dtype=data.dtype, device=data.device)
        owner._parameters[name] = placeholder
        return _Streamed(owner, name, parameter, data.device, store, placeholder, emptied)

    def _move_resident(self, streamed: set[int]) -> None:
        with torch.no_grad():
            for module in self.root.modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is None or id(parameter) in streamed or parameter.device == self.compute_device:
                        continue
                    if parameter.device.type == "meta":
                        continue
                    self._moved.append(_Moved(module, name, False, parameter, parameter.data))
                    parameter.data = parameter.data.to(self.compute_device)
                for name, buffer in list(module._buffers.items()):
                    if buffer is None or buffer.device == self.compute_device or buffer.device.type == "meta":
                        continue
                    self._moved.append(_Moved(module, name, True, buffer, buffer))
                    module._buffers[name] = buffer.to(self.compute_device)

    def _register_hooks(self, block_name: str, block: nn.Module) -> None:
        def load(module, args):
            if block_name not in self._loaded:
                self._load(block_name)

        def release(module, args, output):
            self._release(block_name)

        for module in block.modules():
            self._hooks.append(module.register_forward_pre_hook(load))
        self._hooks.append(block.register_forward_hook(release))

    def _load(self, block_name: str) -> None:
        # One block at a time: a block recomputed in backward replaces the one whose gradients
        # are done; autograd still holds whatever it needs, as its own reference.
        for other in list(self._loaded):
            self._release(other)
        for record in self._streamed[block_name]:
            copy = record.store.to(self.compute_device, non_blocking=record.store.is_pinned(), copy=True)
            record.owner._parameters[record.name] = nn.Parameter(copy, requires_grad=False)
        self._loaded.add(block_name)
        self.loads += 1

    def _release(self, block_name: str) -> None:
        for record in self._streamed[block_name]:
            record.owner._parameters[record.name] = record.placeholder
        self._loaded.discard(block_name)
