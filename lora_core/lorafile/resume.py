"""Continuing training from a LoRA file, and the files that make continuing exact.

What a continued run needs, and where it comes from:
- the trained tensors (adapters and bias/norm deltas): the LoRA file itself, any format
  `files.load_lora` + `keys.to_internal` read (ours, ComfyUI's trainer, kohya-ss, LyCORIS, PEFT);
- the step count: our metadata ("steps"), kohya's ("ss_steps"), and only as a last resort the
  `_<N>_steps_` part of a ComfyUI-trainer file name;
- the optimizer moments: a sidecar `<name>.optim` (safetensors) beside the LoRA (tensors, plus the
  parameter-group layout as JSON in the metadata). Without it the optimizer starts fresh.
Sample order, noise and timesteps are functions of (seed, step), so with these three a run of N
steps continued for M more gives the weights of one N+M run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..adapters.adapter_set import AdapterSet
from ..training.denoiser import Denoiser
from ..errors import UserInputError
from ..atomic import write_bytes_atomically
from .files import load_lora, lora_metadata, read_header, save_lora
from .keys import adapter_set_from_tensors, split_text_encoder
from ..adapters.sliced import Slice, SlicedAdapter
from ..training.optim import normalise_optimizer_name
from ..training.loop import ResumePoint, TrainConfig

# Safetensors content under an extension ComfyUI does not list, so the sidecar never shows up
# as a LoRA in any loader.
log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".optim"
SIDECAR_VERSION = "1"
_STEPS_IN_NAME = re.compile(r"_(\d+)_steps_")


# ---- optimizer state sidecar -------------------------------------------------------------------
def sidecar_path(lora_path: str | Path) -> Path:
    path = Path(lora_path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    return path.with_name(stem + SIDECAR_SUFFIX)


def save_optimizer_state(path: str | Path, optimizer_state: dict, optimizer: str) -> Path:
    """Tensors as `state.<index>.<name>`; scalars and the group layout as JSON metadata."""
    tensors, scalars = {}, {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {
        "lora_trainer.optimizer_state_version": SIDECAR_VERSION,
        "optimizer": optimizer,
        "param_groups": json.dumps(optimizer_state["param_groups"], default=str),
        "scalar_state": json.dumps(scalars),
    }
    return write_bytes_atomically(path, save(tensors, metadata=metadata))


def load_optimizer_state(path: str | Path) -> tuple[dict, str]:
    """(torch optimizer state dict, optimizer name) from a sidecar file."""
    path = Path(path)
    metadata = read_header(path).get("__metadata__") or {}
    if metadata.get("lora_trainer.optimizer_state_version") != SIDECAR_VERSION:
        raise UserInputError(
            f"'{path.name}' is not an optimizer-state file this version can read. Delete it to continue "
            "training with a fresh optimizer."
        )
    state: dict[int, dict] = {}
    for key, tensor in load_file(str(path)).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in json.loads(metadata["scalar_state"]).items():
        state.setdefault(int(index), {}).update(values)
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        for key, value in group.items():
            if key not in ("params", "param_names") and isinstance(value, list):
                group[key] = tuple(value)  # JSON has no tuples; torch's betas are one
    return {"state": state, "param_groups": groups}, metadata["optimizer"]


# ---- metadata ------------------------------------------------------------------------------
def training_settings(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def training_metadata(config: TrainConfig, total_steps: int, loss: list[float] | None = None, extra: dict | None = None) -> dict[str, str]:
    """File metadata for a LoRA trained with `config` (what `resume_point` reads back)."""
    finite = [v for v in (loss or []) if math.isfinite(v)]
    summary = {"loss_first": finite[0], "loss_last": finite[-1], "loss_min": min(finite)} if finite else {}
    return lora_metadata(
        config.adapter.algorithm,
        config.adapter.rank,
        config.adapter.alpha,
        json.dumps(dataclasses.asdict(config.targets), sort_keys=True),
        total_steps,
        training_settings(config),
        {**summary, **(extra or {})},
    )


def save_checkpoint(
    path: str | Path, adapter_set: AdapterSet, config: TrainConfig, total_steps: int, key_prefix: str,
    optimizer_state: dict | None = None, loss: list[float] | None = None, extra: dict | None = None,
) -> Path:
    """The LoRA file with metadata, and its optimizer sidecar when a state is given."""
    path = save_lora(path, adapter_set.to_state_dict(key_prefix), training_metadata(config, total_steps, loss, extra))
    if optimizer_state is not None:
        save_optimizer_state(sidecar_path(path), optimizer_state, config.optimizer)
    return path


def steps_done(metadata: dict[str, str], file_name: str = "") -> int:
    for key in ("steps", "ss_steps"):
        value = metadata.get(key, "")
        if value.strip().isdigit():
            return int(value)
    match = _STEPS_IN_NAME.search(file_name)
    return int(match.group(1)) if match else 0


# ---- resuming -------------------------------------------------------------------------------
def resume_point(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    denoiser: Denoiser,
    config: TrainConfig,
    source: str,
    optimizer_state: dict | None = None,
    optimizer: str | None = None,
    aliases: dict[str, str | Slice] | None = None,
) -> ResumePoint:
    """Adapters, step count and optimizer state to continue from, checked against `config`.
    `aliases`: other names of the model's layers (ComfyUI's key tables), for foreign files."""
    tensors, text_encoder = split_text_encoder(tensors)
    if text_encoder:
        log.warning("%s: %d text-encoder tensors are not continued (the diffusion model trains alone).", source, len(text_encoder))
    adapter_set = adapter_set_from_tensors(tensors, metadata, denoiser.module, denoiser.key_prefix, aliases, source)
    if len(adapter_set) == 0:
        raise UserInputError(f"{source} holds no LoRA tensors for this model: pick another file or start a new LoRA.")
    _check_adapters(adapter_set, config, source)
    if optimizer_state is not None and optimizer is not None and normalise_optimizer_name(optimizer) != config.optimizer:
        sidecar = sidecar_path(source).name if source.endswith(".safetensors") else "its optimizer state"
        raise UserInputError(
            f"{source} was trained with optimizer {optimizer}, but optimizer is set to {config.optimizer}. "
            f"Set optimizer to {optimizer} to continue with its saved state, or delete {sidecar} to "
            "continue with a fresh optimizer."
        )
    return ResumePoint(adapter_set, steps_done(metadata, Path(source).name), optimizer_state, source)


def resume_from_file(
    path: str | Path, denoiser: Denoiser, config: TrainConfig, aliases: dict[str, str | Slice] | None = None
) -> ResumePoint:
    """`resume_point` for a LoRA file, with its optimizer sidecar when one lies beside it."""
    path = Path(path)
    tensors, metadata = load_lora(path)
    optimizer_state, optimizer = None, None
    if sidecar_path(path).is_file():
        optimizer_state, optimizer = load_optimizer_state(sidecar_path(path))
    return resume_point(tensors, metadata, denoiser, config, str(path), optimizer_state, optimizer, aliases)


def _check_adapters(adapter_set: AdapterSet, config: TrainConfig, source: str) -> None:
    wanted = config.adapter
    algorithms = adapter_set.algorithms()
    if algorithms and algorithms != {wanted.algorithm}:
        found = ", ".join(sorted(algorithms))
        raise UserInputError(
            f"{source} is a {found} adapter, but algorithm is set to {wanted.algorithm}. Set algorithm to "
            f"{found} to continue it, or choose no existing LoRA to start a new one."
        )
    for name, adapter in _adapters_and_parts(adapter_set):
        rank = getattr(adapter, "rank", None)
        if wanted.algorithm in ("lora", "loha", "lokr") and rank is not None and rank != wanted.rank:
            raise UserInputError(
                f"{source} has rank {rank} (layer '{name}'), but rank is set to {wanted.rank}. Set rank to "
                f"{rank} to continue it, or choose no existing LoRA to start a new one."
            )
        if not _alpha_agrees(adapter, wanted.alpha):
            raise UserInputError(
                f"{source} has alpha {adapter.alpha:g} (layer '{name}'), but alpha is set to {wanted.alpha:g}. "
                f"Set alpha to {adapter.alpha:g} to continue it, or choose no existing LoRA to start a new one."
            )


def _adapters_and_parts(adapter_set: AdapterSet) -> list[tuple[str, object]]:
    """(name, adapter) for every adapter, with each slice of a fused layer as its own entry."""
    items = []
    for name, adapter in adapter_set.adapter_items():
        if isinstance(adapter, SlicedAdapter):
            items.extend((source, part) for source, _, part in adapter.part_items())
        else:
            items.append((name, adapter))
    return items


def _alpha_agrees(adapter, alpha: float) -> bool:
    """Whether a loaded adapter's alpha is the configured one. Loose: files store alpha as float32,
    and ComfyUI's trainer lets alpha drift (0.999995). LoKr without a low-rank factor has scale 1
    whatever its alpha (LyCORIS writes its dim there). An OFT constraint read from a LyCORIS
    file is alpha * out_channels in ComfyUI's terms, so either meaning agrees."""
    if adapter.algorithm == "lokr" and adapter.rank is None:
        return True
    candidates = [alpha]
    if adapter.algorithm == "oft":
        candidates.append(alpha * adapter.block_count * adapter.block_size)
    return any(math.isclose(adapter.alpha, value, rel_tol=1e-3) for value in candidates)
