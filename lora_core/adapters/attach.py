"""Putting an `AdapterSet` on a model and taking it off again, leaving the model bit for bit as
it was.

Three ways, each returning an `Attachment` (a context manager; removal runs in `finally`, so a
`BaseException` such as ComfyUI's cancel leaves the model untouched):
- bypass: forward hooks compute the layer's new output from its input and unmodified output;
  no weight is read or written, so quantized and offloaded weights work.
- merged: W <- W + s*dW in place; the previous weight is kept on the CPU and copied back.
- merged, trainable: a parametrization recomputes W + s*dW on every access, so gradients reach
  the adapter; the original Parameter object is put back on removal.
Several sets stack in any mix of modes, each with its own strength, and may be removed in any
order: removing an in-place merge from under a later one restores the weight it saw and replays
the later merges.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .adapter_set import AdapterSet, find_module
from . import Adapter, LayerGeometry, adaptable
from .base import compute_dtype
from ..errors import UserInputError
from .targets import is_norm

__all__ = ["AdapterSet", "Attachment", "attach_bypass", "attach_merged"]


class Attachment:
    """Undo for one attach call. `remove()` is idempotent and undoes in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    @property
    def attached(self) -> bool:
        return bool(self._undo)

    def remove(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            undo()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _build(fill: Callable[[Attachment], None]) -> Attachment:
    """Run fill; if it fails part way (bad layer, cancel), undo what it did before re-raising."""
    attachment = Attachment()
    done = False
    try:
        fill(attachment)
        done = True
    finally:
        if not done:
            attachment.remove()
    return attachment


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a Linear/Conv/norm call, positional or passed by keyword."""
    if args:
        return args[0]
    return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()))


def _hook(module: nn.Module, hook) -> Callable[[], None]:
    """Register an output hook that also sees keyword arguments; return its remover."""
    return module.register_forward_hook(hook, with_kwargs=True).remove


def _channel_shape(tensor: torch.Tensor, output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return tensor.to(device=output.device, dtype=output.dtype).reshape(shape)


# ---- bypass ---------------------------------------------------------------------------------
def attach_bypass(model: nn.Module, adapter_set: AdapterSet, strength: float = 1.0) -> Attachment:
    def fill(attachment: Attachment) -> None:
        for name, adapter in adapter_set.adapter_items():
            layer = find_module(model, name)
            hook = _adapter_hook(adapter, LayerGeometry.of(layer, name), adapter_set.bias_diff(name), strength)
            attachment.on_remove(_hook(layer, hook))
        adapted = {name for name, _ in adapter_set.adapter_items()}
        weights = dict(adapter_set.weight_diff_items())
        for name, bias_diff in adapter_set.bias_diff_items():
            if name not in adapted and name not in weights:
                hook = _bias_hook(bias_diff, strength)
                attachment.on_remove(_hook(find_module(model, name), hook))
        for name, weight_diff in weights.items():
            module = find_module(model, name)
            bias_diff = None if name in adapted else adapter_set.bias_diff(name)
            hook = _weight_diff_hook(module, name, weight_diff, bias_diff, strength)
            attachment.on_remove(_hook(module, hook))

    return _build(fill)


def _adapter_hook(adapter: Adapter, geometry: LayerGeometry, bias_diff: torch.Tensor | None, strength: float):
    channel_dim = 1 if geometry.is_conv else -1

    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        bias = getattr(layer, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) else None
        output = adapter.bypass_with_geometry(_layer_input(args, kwargs), output, geometry, bias, strength)
        if bias_diff is not None:
            output = output + _channel_shape(bias_diff * strength, output, channel_dim)
        return output

    return hook


def _channel_dim(module: nn.Module) -> int:
    """Where a layer's output keeps its channels: dim 1 for convs and GroupNorm, else last."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)) else -1


def _bias_hook(bias_diff: torch.Tensor, strength: float):
    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output + _channel_shape(bias_diff * strength, output, _channel_dim(layer))

    return hook


def _normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output before its affine weight and bias: what a weight delta multiplies."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, None, None, norm.eps)
    return F.rms_norm(x, norm.normalized_shape, None, norm.eps)


def _weight_diff_hook(module: nn.Module, name: str, weight_diff: torch.Tensor, bias_diff: torch.Tensor | None, strength: float):
    """Bypass for a plain `.diff`: a norm's affine weight (y = n(x) * w + b, so the change is
    s * n(x) * dw) or, in foreign files, a full weight delta of a Linear/Conv (the change is the
    layer's op applied to s * dW). The stored weight is never touched."""
    channel_dim = _channel_dim(module)
    if adaptable(module):
        geometry = LayerGeometry.of(module, name)

        def change(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            return geometry.dense_output(x, (weight_diff * strength).to(x.dtype))

    elif is_norm(module):

        def change(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            scale = weight_diff * strength
            scale = _channel_shape(scale, output, 1) if channel_dim == 1 else scale.to(output.dtype)
            return _normalized(module, x).to(output.dtype) * scale

    else:
        raise UserInputError(
            f"The LoRA has a weight delta (.diff) for layer '{name}', a {type(module).__name__}, "
            "which bypass mode cannot apply. Use merge mode for this LoRA."
        )

    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        output = output + change(_layer_input(args, kwargs), output)
        if bias_diff is not None:
            output = output + _channel_shape(bias_diff * strength, output, channel_dim)
        return output

    return hook


# ---- merged ---------------------------------------------------------------------------------
def attach_merged(
    model: nn.Module, adapter_set: AdapterSet, strength: float = 1.0, trainable: bool = False
) -> Attachment:
    slots: list[tuple[nn.Module, str, Callable[[torch.Tensor], torch.Tensor]]] = []
    for name, adapter in adapter_set.adapter_items():
        slots.append((find_module(model, name), "weight", _adapter_delta(adapter, strength)))
    for name, diff in adapter_set.weight_diff_items():
        slots.append((find_module(model, name), "weight", _plain_delta(diff, strength)))
    for name, diff in adapter_set.bias_diff_items():
        slots.append((find_module(model, name), "bias", _plain_delta(diff, strength)))

    def fill(attachment: Attachment) -> None:
        for module, attribute, delta in slots:
            _check_mergeable(module, attribute)
            if trainable:
                attachment.on_remove(_parametrize(module, attribute, delta))
            else:
                attachment.on_remove(_merge_in_place(module, attribute, delta))

    return _build(fill)


def _adapter_delta(adapter: Adapter, strength: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda weight: adapter.delta_weight(weight) * strength


def _plain_delta(diff: torch.Tensor, strength: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda weight: diff.to(compute_dtype(diff.dtype)).reshape(weight.shape) * strength


def _stored(module: nn.Module, attribute: str) -> torch.Tensor:
    """The tensor really held: under a parametrization, its original."""
    if parametrize.is_parametrized(module, attribute):
        return getattr(module.parametrizations, attribute).original
    return getattr(module, attribute)


def _check_mergeable(module: nn.Module, attribute: str) -> None:
    tensor = _stored(module, attribute) if hasattr(module, attribute) else None
    if not isinstance(tensor, torch.Tensor) or type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.device.type == "meta":
        raise UserInputError(
            f"Cannot merge into the {attribute} of a {type(module).__name__}: it is not a plain "
            "loaded tensor (quantized, lazy or offloaded). Use bypass mode for this model."
        )


def _added(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + dW formed in float32 or wider, returned in W's dtype, as ComfyUI merges."""
    wide = compute_dtype(weight.dtype)
    return (weight.to(wide) + delta.to(device=weight.device, dtype=wide)).to(weight.dtype)


@dataclass
class _InPlaceMerge:
    delta: Callable[[torch.Tensor], torch.Tensor]
    before: torch.Tensor  # the weight as this merge found it, on the CPU


# module -> attribute -> merges in the order they were applied (for out-of-order removal).
_IN_PLACE: "weakref.WeakKeyDictionary[nn.Module, dict[str, list[_InPlaceMerge]]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _merge_in_place(module: nn.Module, attribute: str, delta: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    stored = _stored(module, attribute)
    merge = _InPlaceMerge(delta, stored.detach().to("cpu", copy=True))
    stored.copy_(_added(stored, delta(stored)))
    stack = _IN_PLACE.setdefault(module, {}).setdefault(attribute, [])
    stack.append(merge)

    @torch.no_grad()
    def undo() -> None:
        tensor = _stored(module, attribute)
        index = stack.index(merge)
        tensor.copy_(merge.before.to(tensor.device))
        stack.pop(index)
        for later in stack[index:]:  # replay merges made after this one on the restored weight
            later.before = tensor.detach().to("cpu", copy=True)
            tensor.copy_(_added(tensor, later.delta(tensor)))

    return undo


class _AddDelta(nn.Module):
    """Parametrization W -> W + delta(W). The delta's owner is held in a closure, not as a
    submodule, so attaching does not add the adapter's parameters to the model."""

    def __init__(self, delta: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _added(weight, self.delta(weight))


def _parametrize(module: nn.Module, attribute: str, delta: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    step = _AddDelta(delta)
    order = list(module._parameters)
    parametrize.register_parametrization(module, attribute, step, unsafe=True)

    def undo() -> None:
        chain = getattr(module.parametrizations, attribute)
        index = next(i for i, item in enumerate(chain) if item is step)
        if len(chain) == 1:
            parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
            # removal re-registers the Parameter last; put it back in its place so the
            # module's state_dict and named_parameters order are as before
            for name in order:
                if name in module._parameters:
                    module._parameters[name] = module._parameters.pop(name)
        else:
            del chain[index]

    return undo
