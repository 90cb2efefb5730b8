"""Block-level gradient checkpointing on any module tree, reversibly.

A diffusion model is a few lists of big blocks (UNet `input_blocks` / `middle_block` /
`output_blocks`, Flux `double_blocks` / `single_blocks`, DiT `blocks`). Checkpointing each block
keeps only block inputs alive between forward and backward and recomputes the inside, which is
where the memory goes; wrapping the whole model (depth 1 in ComfyUI's built-in trainer) saves
nothing. `depth` > 1 wraps the sub-blocks of each block instead, for models whose single blocks
are too big to recompute at once.

The wrap sets an instance `forward` on each block (module names, state-dict keys and hooks stay
as they are) and the context manager deletes it again, so the tree is restored even when
training is cancelled by an exception.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
_HEAVY_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _callable_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Direct non-leaf children, looking through ModuleList/ModuleDict (never called themselves)."""
    found = []
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            found += [(f"{name}.{sub}", grand) for sub, grand in _callable_children(child)]
        elif not _is_leaf(child):
            found.append((name, child))
    return found


def _called_blocks(container: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of a block list whose own forward runs.

    A Sequential member is replaced by its non-leaf members: ComfyUI's UNet steps through each
    TimestepEmbedSequential child by child and never calls the Sequential's forward, so wrapping
    it would checkpoint nothing; wrapping its members is equivalent where the forward is called.
    """
    found = []
    for name, child in _callable_children(container):
        if isinstance(child, nn.Sequential):
            found += [(f"{name}.{sub}", grand) for sub, grand in _called_blocks(child)]
        else:
            found.append((name, child))
    return found


def _direct_layers(module: nn.Module):
    """Leaf children, looking through ModuleList/ModuleDict."""
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _direct_layers(child)
        elif _is_leaf(child):
            yield child


def _sub_blocks(unit: nn.Module) -> list[tuple[str, nn.Module]]:
    """The non-leaf children of `unit`, or [] when a bare Linear/Conv sits directly in it: wrapping
    the rest would leave that layer's activations unprotected (bare norms are cheap and allowed)."""
    if any(isinstance(layer, _HEAVY_LAYERS) for layer in _direct_layers(unit)):
        return []
    return _callable_children(unit)


def _block_lists(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The containers at the shallowest level that has any whose children are real blocks.

    Containers of bare layers (a time-embedding MLP, an output head) are not block lists.
    """
    level = [("", root)]
    while level:
        lists = [
            (name, module)
            for name, module in level
            if module is not root and isinstance(module, _CONTAINERS) and any(not _is_leaf(c) for c in module.children())
        ]
        if lists:
            return lists
        level = [(f"{name}.{sub}" if name else sub, child) for name, module in level for sub, child in module.named_children()]
    return []


def find_checkpoint_blocks(root: nn.Module, depth: int = 1) -> dict[str, nn.Module]:
    """Qualified name -> block to checkpoint. Depth 1: the children of the block lists."""
    units: list[tuple[str, nn.Module]] = []
    for list_name, container in _block_lists(root):
        units += [(f"{list_name}.{name}", child) for name, child in _called_blocks(container)]
    for _ in range(depth - 1):
        deeper = []
        for name, unit in units:
            children = _sub_blocks(unit)
            deeper += [(f"{name}.{sub}", child) for sub, child in children] if children else [(name, unit)]
        units = deeper
    return dict(units)


def _checkpointed(forward: Callable) -> Callable:
    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward


class GradientCheckpointing:
    """Context manager: blocks of `root` recompute their forward in backward while inside.

    The block that runs last is left alone: backward needs its activations at once, so
    recomputing them would cost a forward of that block and save no peak memory (the peak is
    the same whether they were kept or rebuilt). Blocks run in the order they are registered in
    the model families we know (UNet output blocks, Flux single blocks), so the last registered
    one is taken as the last to run; were it not, only that block's activations would be kept.
    """

    def __init__(self, root: nn.Module, depth: int = 1, recompute_last_block: bool = False):
        self.blocks = find_checkpoint_blocks(root, depth)
        if not recompute_last_block and len(self.blocks) > 1:
            self.blocks.pop(list(self.blocks)[-1])
        self._saved: dict[str, tuple[nn.Module, Callable | None]] = {}

    def apply(self) -> "GradientCheckpointing":
        for name, block in self.blocks.items():
            previous = block.__dict__.get("forward")
            self._saved[name] = (block, previous)
            block.forward = _checkpointed(block.forward)
        return self

    def remove(self) -> None:
        while self._saved:
            _, (block, previous) = self._saved.popitem()
            if previous is None:
                del block.forward
            else:
                block.forward = previous

    def __enter__(self) -> "GradientCheckpointing":
        return self.apply()

    def __exit__(self, *exc_info) -> None:
        self.remove()
