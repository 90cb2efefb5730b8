"""Optimizer factory: the built-in torch optimizers plus well-kept optional ones, and LoRA+.

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) trains the output-side factor (LoRA's
`up`, LoHa's `w1_a`/`w2_a`) with a learning rate `loraplus_ratio` times higher. LoKr and OFT have
no such factor and train at the base rate. The parameters are split into two groups by name, so
the split shows in the saved optimizer layout.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UserInputError

BUILTIN_OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor")
OPTIONAL_OPTIMIZERS = {"prodigy": "prodigyopt", "lion": "lion-pytorch", "adamw8bit": "bitsandbytes"}
OPTIMIZERS = BUILTIN_OPTIMIZERS + tuple(OPTIONAL_OPTIMIZERS)

# Parameter-name endings of the output-side factors, the ones LoRA+ speeds up.
UP_FACTOR_ENDINGS = (".up", "lora_up.weight", "hada_w1_a", "hada_w2_a")


def normalise_optimizer_name(name: str) -> str:
    normalised = name.lower().replace("-", "").replace("_", "")
    if normalised not in OPTIMIZERS:
        raise UserInputError(f"optimizer = {name!r} is not supported: choose one of {', '.join(OPTIMIZERS)}.")
    return normalised


def is_up_factor(parameter_name: str) -> bool:
    return parameter_name.endswith(UP_FACTOR_ENDINGS)


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], learning_rate: float, loraplus_ratio: float
) -> list[dict]:
    """Trainable parameters in a fixed order, split for LoRA+ when the ratio is not 1.

    Each group records its parameter names ("param_names", as torch does) so the optimizer state can be checked against the
    adapters it is loaded into on resume.
    """
    trainable = [(name, p) for name, p in named_parameters if p.requires_grad]
    if not trainable:
        raise UserInputError(
            "No trainable parameters: the target layers matched nothing. Check the target preset and "
            "include/exclude patterns."
        )
    if loraplus_ratio == 1.0:
        return [{"params": [p for _, p in trainable], "param_names": [n for n, _ in trainable], "lr": learning_rate}]
    base = [(n, p) for n, p in trainable if not is_up_factor(n)]
    up = [(n, p) for n, p in trainable if is_up_factor(n)]
    groups = []
    for members, lr in ((base, learning_rate), (up, learning_rate * loraplus_ratio)):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members], "lr": lr})
    return groups


def _import_optional(name: str, module: str):
    package = OPTIONAL_OPTIMIZERS[name]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserInputError(
            f"optimizer = {name!r} needs the package '{package}', which is not installed: run "
            f"`pip install {package}` in ComfyUI's Python environment, or pick AdamW."
        ) from error


def make_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """`groups` from `parameter_groups`; each group's "lr" is the base rate the schedule scales."""
    name = normalise_optimizer_name(name)
    for group in groups:
        group["initial_lr"] = group["lr"]
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, weight_decay=weight_decay)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise UserInputError("optimizer = 'adafactor' needs torch 2.5 or newer: update torch, or pick AdamW.")
        return torch.optim.Adafactor(groups, weight_decay=weight_decay)
    if name == "prodigy":
        return _import_optional(name, "prodigyopt").Prodigy(groups, weight_decay=weight_decay)
    if name == "lion":
        return _import_optional(name, "lion_pytorch").Lion(groups, weight_decay=weight_decay)
    return _import_optional(name, "bitsandbytes").optim.AdamW8bit(groups, weight_decay=weight_decay)


def align_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, source: str) -> dict:
    """`saved` (a state dict whose groups carry "param_names") re-keyed to `optimizer`'s parameters.

    Matching goes by parameter name, not position: adapters rebuilt from a file come in the
    file's key order, not the model's. Hyperparameters stay those of `optimizer` (this run's
    settings); only the per-parameter moments and step counts come from `saved`.
    """
    saved_index = {
        name: index
        for group in saved.get("param_groups", [])
        for name, index in zip(group.get("param_names", []), group["params"])
    }
    current = optimizer.state_dict()
    state = {}
    for group in current["param_groups"]:
        for name, index in zip(group["param_names"], group["params"]):
            if name not in saved_index:
                raise UserInputError(
                    f"The optimizer state in {source} has nothing for parameter '{name}': it belongs to "
                    "other adapters. Delete that file to continue with a fresh optimizer."
                )
            if saved_index[name] in saved["state"]:
                state[index] = saved["state"][saved_index[name]]
    return {"state": state, "param_groups": current["param_groups"]}
