"""`AdapterSet`: every trained tensor of one LoRA, by module name, and its state-dict form.

Holds the adapters (module name -> Adapter) plus the plain deltas ComfyUI calls `.diff` (a norm
layer's weight) and `.diff_b` (a bias). Names are the dotted names relative to the model given;
nn.ModuleDict keys may not contain dots, so they are stored escaped. `to_state_dict` produces
ComfyUI-internal keys (`diffusion_model.<module>.<suffix>`, what ComfyUI's trainer outputs and its
loader reads); `from_state_dict` is its inverse and checks shapes against a model when given one.
"""

from __future__ import annotations

import torch
from torch import nn

from . import (
    LayerGeometry,
    SUFFIXES,
    UNSUPPORTED_SUFFIXES,
    Adapter,
    AdapterSpec,
    adapter_from_tensors,
    create_adapter,
)
from ..errors import UserInputError
from .sliced import Slice, SlicedAdapter
from .targets import TargetSpec, find_norms, find_targets

WEIGHT_DIFF = "diff"
BIAS_DIFF = "diff_b"
# Longest first, so "lora_down.weight" wins over any shorter suffix that ends the same way.
KNOWN_SUFFIXES = sorted(
    {s for group in SUFFIXES.values() for s in group} | set(UNSUPPORTED_SUFFIXES) | {"alpha", WEIGHT_DIFF, BIAS_DIFF},
    key=len,
    reverse=True,
)


def escape(name: str) -> str:
    return name.replace("%", "%25").replace(".", "%2E")


def unescape(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


def split_key(key: str) -> tuple[str, str] | None:
    """'a.b.lora_up.weight' -> ('a.b', 'lora_up.weight'); None for a key of no known suffix."""
    for suffix in KNOWN_SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            return tensor.device
    return None


class AdapterSet(nn.Module):
    def __init__(
        self,
        adapters: dict[str, Adapter] | None = None,
        weight_diffs: dict[str, torch.Tensor] | None = None,
        bias_diffs: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({escape(n): a for n, a in (adapters or {}).items()})
        self.weight_diffs = nn.ParameterDict({escape(n): _parameter(t) for n, t in (weight_diffs or {}).items()})
        self.bias_diffs = nn.ParameterDict({escape(n): _parameter(t) for n, t in (bias_diffs or {}).items()})

    # ---- what is inside -------------------------------------------------------------------
    def adapter_items(self) -> list[tuple[str, Adapter]]:
        return [(unescape(k), a) for k, a in self.adapters.items()]

    def weight_diff_items(self) -> list[tuple[str, nn.Parameter]]:
        return [(unescape(k), p) for k, p in self.weight_diffs.items()]

    def bias_diff_items(self) -> list[tuple[str, nn.Parameter]]:
        return [(unescape(k), p) for k, p in self.bias_diffs.items()]

    def module_names(self) -> list[str]:
        names = dict.fromkeys(n for n, _ in self.adapter_items())
        names.update(dict.fromkeys(n for n, _ in self.weight_diff_items()))
        names.update(dict.fromkeys(n for n, _ in self.bias_diff_items()))
        return list(names)

    def algorithms(self) -> set[str]:
        return {a.algorithm for _, a in self.adapter_items()}

    def bias_diff(self, name: str) -> nn.Parameter | None:
        key = escape(name)
        return self.bias_diffs[key] if key in self.bias_diffs else None

    def __len__(self) -> int:
        return len(self.module_names())

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model: nn.Module,
        spec: AdapterSpec,
        targets: TargetSpec,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> "AdapterSet":
        """Fresh adapters (exact identity) for the target layers of model, drawn from generator
        in model order, so the same seed gives the same adapters on any device."""
        spec.validate()
        layers = find_targets(model, targets)
        if not layers:
            raise UserInputError(
                f"No layer of the model matches target preset '{targets.preset}' with include "
                f"{targets.include} and exclude {targets.exclude}. Use preset 'all' or loosen the patterns."
            )
        adapters, bias_diffs, weight_diffs = {}, {}, {}
        for name, layer in layers.items():
            device = _device_of(layer)
            adapters[name] = create_adapter(spec, layer, generator, dtype, name).to(device=device)
            bias = getattr(layer, "bias", None)
            if targets.train_norms_and_biases and isinstance(bias, torch.Tensor):
                bias_diffs[name] = torch.zeros(bias.shape, dtype=dtype, device=device)
        for name, norm in find_norms(model, targets).items():
            device = _device_of(norm)
            weight_diffs[name] = torch.zeros(norm.weight.shape, dtype=dtype, device=device)
            if isinstance(getattr(norm, "bias", None), torch.Tensor):
                bias_diffs[name] = torch.zeros(norm.bias.shape, dtype=dtype, device=device)
        return cls(adapters, weight_diffs, bias_diffs)

    # ---- state dict ---------------------------------------------------------------------------
    def to_state_dict(self, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
        """ComfyUI-internal keys; every adapted module carries its `.alpha`. Detached copies, so
        later training does not change a state dict already handed out."""
        state = {}
        for name, adapter in self.adapter_items():
            if isinstance(adapter, SlicedAdapter):  # parts keep the names that say which slice
                for source, _, part in adapter.part_items():
                    for suffix, tensor in part.file_tensors().items():
                        state[f"{source}.{suffix}"] = tensor.detach().clone()
                continue
            for suffix, tensor in adapter.file_tensors().items():
                state[f"{prefix}{name}.{suffix}"] = tensor.detach().clone()
        for name, diff in self.weight_diff_items():
            state[f"{prefix}{name}.{WEIGHT_DIFF}"] = diff.detach().clone()
        for name, diff in self.bias_diff_items():
            state[f"{prefix}{name}.{BIAS_DIFF}"] = diff.detach().clone()
        return state

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        model: nn.Module | None = None,
        prefix: str = "diffusion_model.",
        slices: dict[str, Slice] | None = None,
    ) -> "AdapterSet":
        """Rebuild from ComfyUI-internal keys (use `files.to_internal` first for other formats).
        `slices` names the unprefixed modules that are slices of a fused layer (source name ->
        Slice). With a model, every module must exist and fit, and tensors move to its device."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        sliced: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            parts = split_key(key)
            if slices and parts is not None and parts[0] in slices:
                sliced.setdefault(parts[0], {})[parts[1]] = tensor
                continue
            if not key.startswith(prefix):
                raise UserInputError(
                    f"LoRA key '{key}' does not start with '{prefix}'. Convert foreign files with "
                    "lora_core.lorafile.files.to_internal before loading them."
                )
            parts = split_key(key[len(prefix):])
            if parts is None:
                raise UserInputError(
                    f"LoRA key '{key}' ends in no tensor name this pack knows (lora_up.weight, "
                    "hada_w1_a, lokr_w1, oft_blocks, alpha, diff, diff_b ...). The file is not a "
                    "LoRA for a diffusion model, or uses a format this pack cannot read."
                )
            module, suffix = parts
            grouped.setdefault(module, {})[suffix] = tensor
        adapters, weight_diffs, bias_diffs = {}, {}, {}
        for name, tensors in grouped.items():
            layer = find_module(model, name) if model is not None else None
            device = _device_of(layer) if layer is not None else None
            if WEIGHT_DIFF in tensors:
                weight_diffs[name] = _checked_diff(tensors.pop(WEIGHT_DIFF), layer, "weight", name).to(device)
            if BIAS_DIFF in tensors:
                bias_diffs[name] = _checked_diff(tensors.pop(BIAS_DIFF), layer, "bias", name).to(device)
            if set(tensors) - {"alpha"}:
                adapters[name] = adapter_from_tensors(tensors, layer, name).to(device=device)
        for name, adapter in _sliced_adapters(sliced, slices or {}, model).items():
            if name in adapters:
                raise UserInputError(
                    f"The LoRA has tensors for all of layer '{name}' and also for slices of it "
                    f"({', '.join(adapter.source_names)}). Use one or the other."
                )
            adapters[name] = adapter
        return cls(adapters, weight_diffs, bias_diffs)


def _sliced_adapters(
    sliced: dict[str, dict[str, torch.Tensor]], slices: dict[str, Slice], model: nn.Module | None
) -> dict[str, SlicedAdapter]:
    """One SlicedAdapter per fused layer from its parts' tensors, checked against the layer."""
    by_layer: dict[str, list] = {}
    for source, tensors in sliced.items():
        where = slices[source]
        by_layer.setdefault(where.module, []).append((source, where, adapter_from_tensors(tensors, None, source)))
    result = {}
    for name, parts in by_layer.items():
        adapter = SlicedAdapter(parts)
        if model is not None:
            layer = find_module(model, name)
            geometry = LayerGeometry.of(layer, name)
            if not adapter.fits(geometry):
                raise UserInputError(
                    f"The LoRA's tensors for slices of layer '{name}' ({adapter.extra_repr()}) do not fit its "
                    f"weight of shape {tuple(geometry.weight_shape)}. The LoRA was made for a different model."
                )
            adapter = adapter.to(device=_device_of(layer))
        result[name] = adapter
    return result


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor)


def find_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserInputError(
            f"The LoRA has tensors for layer '{name}', which this model does not have. The LoRA "
            "was made for a different model; pick one trained on this base model."
        ) from None


def _checked_diff(diff: torch.Tensor, layer: nn.Module | None, attribute: str, name: str) -> torch.Tensor:
    if layer is None:
        return diff.clone()
    target = getattr(layer, attribute, None)
    if not isinstance(target, torch.Tensor):
        raise UserInputError(
            f"The LoRA has a {attribute} delta for layer '{name}', which has no {attribute} in this "
            "model. The LoRA was made for a different model."
        )
    if tuple(diff.shape) != tuple(target.shape):
        raise UserInputError(
            f"The LoRA's {attribute} delta for layer '{name}' has shape {tuple(diff.shape)}, but "
            f"the model's {attribute} has shape {tuple(target.shape)}. The LoRA was made for a "
            "different model."
        )
    return diff.clone()
