"""The files a training run leaves, named and filled the same way from the graph and from a headless run.

Save LoRA Weights, Plot Loss Graph and Train LoRA's checkpoints call these with ComfyUI's loras/
and output/ folders; `nodes/headless.py` calls them with the same folders of the ComfyUI it loads
(or a folder given on the command line). Plain Python + lora_core: no ComfyUI import, so the
headless runner and the tests use them without ComfyUI.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..lora_core.adapters.adapter_set import split_key
from ..lora_core.atomic import write_bytes_atomically
from ..lora_core.data.paths import is_inside, resolve_inside
from ..lora_core.errors import UserInputError
from ..lora_core.lorafile import files, resume
from ..lora_core.lorafile.keys import INTERNAL_PREFIX
from ..lora_core.lorafile.lora_model import LoraModel
from ..lora_core.plotting import loss_chart_png
from ..lora_core.training.loop import TrainConfig, TrainResult
from .lists import lora_file_name, loss_summary, next_counter

LORA_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# Widgets that shape the run but are not part of TrainConfig, recorded in the file too.
NODE_ONLY_SETTINGS = ("lora_dtype", "quantized_backward", "bucket_mode", "existing_lora")


# ---- the LORA_MODEL a run produces ----------------------------------------------------------------
def lora_output(result: TrainResult, config: TrainConfig, v: dict, base_model: str,
                prediction_type: str, kohya_naming=None) -> LoraModel:
    """The LORA_MODEL: ComfyUI-internal tensors in lora_dtype (alphas stay float32), metadata,
    optimizer state, and how kohya-ss names the model's layers (for the kohya export)."""
    dtype = LORA_DTYPES[v["lora_dtype"]]
    tensors = {
        key: tensor if key.endswith(".alpha") or not tensor.is_floating_point() else tensor.to(dtype)
        for key, tensor in result.adapter_set.to_state_dict().items()
    }
    metadata = resume.training_metadata(config, result.total_steps, result.loss, extra={
        "base_model": base_model,
        "prediction_type": prediction_type,
        "node_settings": {name: v[name] for name in NODE_ONLY_SETTINGS},
        "loss_summary": loss_summary(result.loss),
        "stopped_early": str(result.stopped_early).lower(),
    })
    return LoraModel({k: t.detach().cpu() for k, t in tensors.items()}, metadata, result.optimizer_state, kohya_naming)


# ---- LoRA files ---------------------------------------------------------------------------------
def algorithm_of(tensors: dict) -> str:
    """lora / loha / lokr / oft read off the tensor names (for LoRAs without our metadata)."""
    suffixes = {split_key(k)[1] for k in tensors if split_key(k) is not None}
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    if "oft_blocks" in suffixes:
        return "oft"
    return "lora"


def rank_of(tensors: dict) -> int:
    for key, tensor in tensors.items():
        if key.endswith(("lora_down.weight", "hada_w1_b")) and tensor.ndim >= 2:
            return int(tensor.shape[0])
    return 0


def alpha_of(tensors: dict) -> float:
    for key, tensor in tensors.items():
        if key.endswith(".alpha") and tensor.numel() == 1:
            return float(tensor.item())
    return 0.0


def file_metadata(lora: LoraModel, steps: int | None) -> dict:
    """Our metadata for a LoraModel; a core-made dict gets what its tensor names tell."""
    if lora.metadata:
        metadata = dict(lora.metadata)
        if steps is not None and steps > 0:
            metadata["steps"] = metadata["ss_steps"] = str(steps)
        return metadata
    return files.lora_metadata(algorithm=algorithm_of(lora), rank=rank_of(lora), alpha=alpha_of(lora), targets="unknown",
                               steps=steps or 0, extra={"source": "LORA_MODEL without metadata"})


def prefix_folder(root: Path, prefix: str) -> tuple[Path, str]:
    """(folder, file-name prefix) for a save prefix like "my_project/character" inside `root`."""
    root = Path(root)
    text = prefix.strip().replace("\\", "/")
    if not text or text.endswith("/"):
        raise UserInputError(
            f"The file prefix {prefix!r} has no file name: use e.g. 'my_lora' or 'project/my_lora'."
        )
    folder_part, _, name = text.rpartition("/")
    folder = resolve_inside(root, folder_part, "prefix folder") if folder_part else root
    if not is_inside(root, folder):
        raise UserInputError(f"The prefix {prefix!r} leads outside {root}: give a path inside the loras folder.")
    return folder, name


def write_lora_file(root: Path, lora: LoraModel, prefix: str, steps: int | None, kohya_export: bool = False) -> Path:
    """Write `lora` to <root>/<prefix>[_<steps>_steps]_<NNNNN>_.safetensors (never overwriting),
    its optimizer state beside it when it has one, and a kohya-named copy on request (named for
    the model it was trained on, which our Train LoRA records in the LORA_MODEL)."""
    metadata = file_metadata(lora, steps)
    kohya = None
    if kohya_export:  # before anything is written: a LoRA kohya-ss cannot name stops here
        if lora.kohya_naming is None:
            raise UserInputError("kohya_export needs the layer names of the model the LoRA was trained on, which only "
                                 "our Train LoRA records: turn kohya_export off for this LoRA, or continue it in our "
                                 "Train LoRA (existing_lora) and export that.")
        kohya = files.kohya_contents(lora.tensors(), metadata, INTERNAL_PREFIX, lora.kohya_naming)
    folder, name = prefix_folder(root, prefix)
    folder.mkdir(parents=True, exist_ok=True)
    counter = next_counter(name, os.listdir(folder))
    path = folder / lora_file_name(name, steps, counter)
    while path.exists():
        counter += 1
        path = folder / lora_file_name(name, steps, counter)
    files.save_lora(path, lora.tensors(), metadata)
    if lora.optimizer_state is not None:
        save_optimizer_state(path, lora)
    if kohya is not None:
        files.save_lora(path.with_name(path.stem.rstrip("_") + "_kohya.safetensors"), *kohya)
    return path


def save_optimizer_state(lora_path: Path, lora: LoraModel) -> None:
    """The optimizer sidecar (`<name>.optim`) that lets existing_lora resume exactly."""
    settings = json.loads(lora.metadata.get("training_settings", "{}"))
    if "optimizer" not in settings:
        raise UserInputError("The LoRA carries optimizer state but no training settings naming the optimizer: "
                             "connect the 'lora' output of Train LoRA directly.")
    resume.save_optimizer_state(resume.sidecar_path(lora_path), lora.optimizer_state, settings["optimizer"])


# ---- loss chart ---------------------------------------------------------------------------------
def loss_series(loss_map) -> tuple[list[float], list[int] | None, list[tuple[int, float]]]:
    """(loss values, their steps or None, (step, validation loss) pairs) from any LOSS_MAP."""
    if not isinstance(loss_map, dict) or "loss" not in loss_map:
        raise UserInputError("The loss input is not a loss map: connect the 'loss_map' output of Train LoRA.")
    values = [float(v) for v in loss_map["loss"]]
    steps = loss_map.get("steps")
    steps = [int(s) for s in steps] if steps is not None and len(steps) == len(values) else None
    val = loss_map.get("val_loss") or []
    val_steps = loss_map.get("val_steps") or []
    validation = []
    if val and len(val_steps) == len(val):
        validation = [(int(s), float(v)) for s, v in zip(val_steps, val)]
    elif val and isinstance(val[0], (list, tuple)):
        validation = [(int(s), float(v)) for s, v in val]
    if not values and not validation:
        raise UserInputError("The loss map is empty: train for at least one step before plotting.")
    return values, steps, validation


def loss_graph_png(loss_map, log_scale: bool) -> bytes:
    """Plot Loss Graph's chart: raw loss, smoothed curve, validation loss."""
    values, steps, validation = loss_series(loss_map)
    summary = loss_summary(values)
    title = "Training loss" + (f" (last {summary['last_mean']:.4f})" if summary else "")
    return loss_chart_png(values, steps=steps, val_loss=validation, log_scale=log_scale, title=title)


def output_image_path(output_dir: Path, prefix: str) -> tuple[Path, str]:
    """(a new, never-used PNG path under `output_dir` for `prefix`, its subfolder relative to it)."""
    output_dir = Path(output_dir)
    text = prefix.strip().replace("\\", "/")
    folder_part, _, name = text.rpartition("/")
    if not name:
        raise UserInputError(f"The file prefix {prefix!r} has no file name: use e.g. 'loss_graph' or 'runs/loss'.")
    folder = resolve_inside(output_dir, folder_part, "prefix folder") if folder_part else output_dir
    folder.mkdir(parents=True, exist_ok=True)
    counter = 1
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{5,}})_\.png$")
    for existing in os.listdir(folder):
        match = pattern.match(existing)
        if match:
            counter = max(counter, int(match.group(1)) + 1)
    path = folder / f"{name}_{counter:05d}_.png"
    while path.exists():
        counter += 1
        path = folder / f"{name}_{counter:05d}_.png"
    return path, folder.relative_to(output_dir).as_posix() if folder != output_dir else ""


def write_loss_graph(output_dir: Path, prefix: str, loss_map, log_scale: bool) -> tuple[Path, str, bytes]:
    """(path, subfolder, PNG bytes) of the chart written as Plot Loss Graph writes it."""
    png = loss_graph_png(loss_map, log_scale)
    path, subfolder = output_image_path(output_dir, prefix)
    write_bytes_atomically(path, png)
    return path, subfolder, png
