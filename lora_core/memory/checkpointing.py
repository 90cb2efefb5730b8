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

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .autograd_safety import recompute_context

_log = logging.getLogger(__name__)
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


def _contexts():
    # The recompute of a block that writes into tensors it saved must see what the forward saw:
    # inside a training run, AutogradSafety tracks what the recompute saves (no-op otherwise).
    return contextlib.nullcontext(), recompute_context()


def _checkpointed(forward: Callable) -> Callable:
    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Tensor keyword arguments go in positionally: checkpoint saves positional tensors for the
        # recompute (so a later in-place write into one is caught), but keeps keyword ones as bare
        # references that such a write would silently change (Flux passes img=, txt=).
        names = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
        if not names:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
        others = {name: value for name, value in kwargs.items() if name not in names}
        count = len(args)

        def positional_forward(*inputs):
            return forward(*inputs[:count], **others, **dict(zip(names, inputs[count:])))

        return checkpoint(positional_forward, *args, *(kwargs[name] for name in names), use_reentrant=False,
                          context_fn=_contexts)

    return checkpointed_forward


@dataclass
class BlockCost:
    """What keeping one block's activations costs, and what recomputing them instead costs."""

    saved_bytes: int  # tensors autograd saves for backward inside the block (not weights, not block inputs)
    flops: int  # forward FLOPs: what a recompute costs


def _attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    """Q·Kᵀ and the weighted sum over V, for any leading (batch, head) dims."""
    pairs = math.prod(query.shape[:-1]) * key.shape[-2]
    return 2 * pairs * (query.shape[-1] + value.shape[-1])


_attention_flops._get_raw = True  # FlopCounterMode: called with the tensors themselves, not their shapes


def _flop_counter() -> FlopCounterMode:
    # PyTorch's counter knows the CUDA attention kernels; older versions miss the CPU one.
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    custom = {}
    if cpu_attention is not None and cpu_attention not in flop_registry:
        custom[cpu_attention] = _attention_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory behind `tensor`; views share it. Wrapper subclasses (e.g.
    quantized weights) have no storage of their own: the tensor itself is the unit then."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return id(tensor), tensor.numel() * tensor.element_size()


def tensor_storages(tensors) -> set[int]:
    return {_storage(t)[0] for t in tensors if isinstance(t, torch.Tensor)}


def _private_copy(value):
    if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
        return value
    # A clone in the graph, not a new leaf: code may write into it in place (a leaf would refuse).
    return value.clone() if value.requires_grad else value.detach().clone()


def measure_block(forward: Callable, args: tuple, kwargs: dict, excluded_storages: set[int]) -> BlockCost:
    """Run `forward` once with autograd on, count the bytes it saves for backward and its FLOPs, drop the result.

    The peak is one block's activations, which a checkpointed backward holds anyway while it
    recomputes that block. RNG state is restored, so dropout draws are as if this never ran. The
    block runs on copies of its tensor inputs: a block that writes into its inputs in place
    (inference code does) must not change what the real call after this one reads.
    """
    args = tuple(_private_copy(a) for a in args)
    kwargs = {k: _private_copy(v) for k, v in kwargs.items()}
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    inputs = tensor_storages(tensors)
    seen: dict[int, int] = {}

    def pack(tensor):
        key, size = _storage(tensor)
        if key not in excluded_storages and key not in inputs:
            seen[key] = size
        # Detached: a tensor an op saves of its own output (softmax, exp, sigmoid...) would otherwise
        # hold its grad_fn, which holds it: a cycle through C++ that Python's gc never frees.
        return tensor.detach()

    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), _flop_counter() as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward(*args, **kwargs)
        del output
    return BlockCost(sum(seen.values()), int(flops.get_total_flops()))


def choose_blocks(costs: dict[str, BlockCost], keep_budget: int) -> set[str]:
    """The blocks to recompute: the others keep their activations, least bytes per FLOP first, while
    they fit in `keep_budget` bytes.

    Blocks differ a lot: frozen convolutions save nothing for backward, so a UNet's res-blocks hold
    ~10x less activation memory per FLOP than its attention blocks; keeping them costs little and
    spares their recompute.
    """
    order = sorted((name for name, cost in costs.items() if cost.saved_bytes > 0),
                   key=lambda name: costs[name].saved_bytes / max(costs[name].flops, 1))
    kept, recomputed = 0, set()
    for name in order:
        if kept + costs[name].saved_bytes <= keep_budget:
            kept += costs[name].saved_bytes
        else:
            recomputed.add(name)
    return recomputed


class GradientCheckpointing:
    """Context manager: blocks of `root` recompute their forward in backward while inside.

    The block that runs last is left alone: backward needs its activations at once, so
    recomputing them would cost a forward of that block and save no peak memory (the peak is
    the same whether they were kept or rebuilt). Blocks run in the order they are registered in
    the model families we know (UNet output blocks, Flux single blocks), so the last registered
    one is taken as the last to run; were it not, only that block's activations would be kept.

    With `keep_budget` (bytes, asked for once), recomputing is kept to what memory needs: the
    first forward with autograd measures each block once more (the bytes it saves for backward
    and its FLOPs; the result is dropped) while every block is still recomputed, and from the next
    forward on only the blocks `choose_blocks` picks are. Without it, every block is recomputed.
    """

    def __init__(self, root: nn.Module, depth: int = 1, recompute_last_block: bool = False,
                 keep_budget: Callable[[], int] | None = None):
        self.root = root
        self.blocks = find_checkpoint_blocks(root, depth)
        if not recompute_last_block and len(self.blocks) > 1:
            self.blocks.pop(list(self.blocks)[-1])
        self.keep_budget = keep_budget
        self.costs: dict[str, BlockCost] = {}
        self.recomputed: set[str] | None = set(self.blocks) if keep_budget is None else None  # None: not chosen yet
        self._saved: dict[str, tuple[nn.Module, Callable | None]] = {}
        self._weights: set[int] = set()

    def apply(self) -> "GradientCheckpointing":
        if self.recomputed is None:
            self._weights = tensor_storages((*self.root.parameters(), *self.root.buffers()))
        for name, block in self.blocks.items():
            previous = block.__dict__.get("forward")
            self._saved[name] = (block, previous)
            block.forward = self._forward_for(name, block.forward)
        return self

    def _forward_for(self, name: str, forward: Callable) -> Callable:
        checkpointed = _checkpointed(forward)
        if self.recomputed is not None:
            return checkpointed

        def selective_forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            if self.recomputed is None:
                if name not in self.costs:
                    self.costs[name] = measure_block(forward, args, kwargs, self._weights)
                    return checkpointed(*args, **kwargs)
                self._choose()  # a block runs again: the first pass is over
            return checkpointed(*args, **kwargs) if name in self.recomputed else forward(*args, **kwargs)

        return selective_forward

    def _choose(self) -> None:
        budget = max(0, int(self.keep_budget()))
        self.recomputed = choose_blocks(self.costs, budget)
        self.recomputed |= set(self.blocks) - set(self.costs)  # never measured (did not run): stay safe
        self._weights = set()
        _log.info("Gradient checkpointing: %d of %d blocks recomputed; the others keep %.0f MiB of activations "
                  "(budget %.0f MiB).", len(self.recomputed), len(self.blocks), self.kept_bytes() / 2**20,
                  budget / 2**20)

    def kept_bytes(self) -> int:
        """Activation bytes the blocks not recomputed keep (measured ones; 0 before the choice)."""
        if self.recomputed is None:
            return 0
        return sum(cost.saved_bytes for name, cost in self.costs.items() if name not in self.recomputed)

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
