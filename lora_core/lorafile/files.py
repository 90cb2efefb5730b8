"""LoRA files: safetensors only, written atomically, read with clear errors, metadata in the header.

A write goes to a temporary name in the destination folder and is renamed over the target only
when complete, so a crash or cancel never leaves a half file under the real name. Reading checks
the header against the file size before handing the file to safetensors, so truncated downloads
and non-safetensors files get a message saying so instead of a parser error. Nothing here ever
unpickles.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..atomic import write_bytes_atomically
from ..errors import UserInputError
from .keys import INTERNAL_PREFIX, OFT_CONSTRAINT_COMFY, OFT_CONSTRAINT_KEY, KohyaNaming, to_internal, to_kohya

__all__ = ["FORMAT_VERSION", "kohya_contents", "load_lora", "lora_metadata", "save_kohya_lora", "save_lora", "to_internal", "to_kohya"]

FORMAT_VERSION = "1"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on header size
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def lora_metadata(
    algorithm: str,
    rank: int,
    alpha: float,
    targets: str,
    steps: int,
    training_settings: dict | None = None,
    extra: dict[str, object] | None = None,
) -> dict[str, str]:
    """Our metadata plus the kohya-ss fields other UIs show (network dim/alpha/module, steps)."""
    kohya_module = "networks.lora" if algorithm == "lora" else "lycoris.kohya"
    metadata = {
        "lora_trainer.format_version": FORMAT_VERSION,
        "algorithm": algorithm,
        "rank": str(rank),
        "alpha": str(alpha),
        "targets": targets,
        "steps": str(steps),
        "training_settings": json.dumps(training_settings or {}, sort_keys=True, default=str),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_module": kohya_module,
        "ss_steps": str(steps),
    }
    if algorithm != "lora":  # LyCORIS' names for the algorithm
        metadata["ss_network_args"] = json.dumps({"algo": "diag-oft" if algorithm == "oft" else algorithm})
    if algorithm == "oft":  # LyCORIS reads the same alpha as a bound of alpha * out_channels
        metadata[OFT_CONSTRAINT_KEY] = OFT_CONSTRAINT_COMFY
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return metadata


def save_lora(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write state_dict (+ metadata, every value stored as a string) to path atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserInputError(f"LoRA files are written as .safetensors; '{path.name}' has another extension.")
    header = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in (metadata or {}).items()}
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items()}
    tensors = _unshared(tensors)
    return write_bytes_atomically(path, save(tensors, metadata=header))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; copy any that do."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for key, tensor in tensors.items():
        marker = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and marker in seen:
            tensor = tensor.clone()
        seen.add(marker)
        result[key] = tensor
    return result


def read_header(path: Path) -> dict:
    """The parsed safetensors header, after checking the file can hold what it declares."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"it is only {size} bytes long")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(size - 8, _HEADER_LIMIT):
            raise _corrupt(path, "its header length does not fit the file (truncated, or not safetensors)")
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "its header is not valid safetensors JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_length = size - 8 - header_length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _corrupt(path, f"tensor '{key}' has no valid data offsets")
        if offsets[1] > data_length:
            raise _corrupt(
                path, f"tensor '{key}' ends at byte {offsets[1]} of {data_length} data bytes (truncated)"
            )
    return header


def _corrupt(path: Path, why: str) -> UserInputError:
    return UserInputError(
        f"'{path}' cannot be read as a LoRA: {why}. Download or export the file again."
    )


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors LoRA file; never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"LoRA file '{path}' does not exist. Check the name and the loras folder.")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise UserInputError(
            f"'{path.name}' is a pickle-based file; only .safetensors LoRAs are loaded, since "
            "pickles can run code. Convert it to safetensors first."
        )
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise _corrupt(path, f"safetensors reports: {error}") from None
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def kohya_contents(
    state_dict: dict[str, torch.Tensor],
    metadata: dict | None = None,
    prefix: str = INTERNAL_PREFIX,
    naming: KohyaNaming | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of the kohya-ss export: kohya-ss names and the `ss_*` fields those
    tools write for the family. `naming` None: our module names as they are (models we do not
    know the family of); a family without confirmed kohya-ss names gets a message, not a guess."""
    if naming is not None and naming.names is None:
        raise UserInputError(
            f"No kohya-ss export for {naming.family}: {naming.reason} Save without kohya_export; ComfyUI "
            "reads the default file."
        )
    tensors = to_kohya(state_dict, prefix, naming.names if naming is not None else None)
    header = dict(metadata or {})
    if naming is not None:
        fields = dict(naming.metadata)
        if header.get("algorithm", "lora") != "lora":  # LyCORIS algorithms load through lycoris.kohya
            fields.pop("ss_network_module", None)
        header.update(fields)
    return tensors, header


def save_kohya_lora(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict | None = None,
    prefix: str = INTERNAL_PREFIX,
    naming: KohyaNaming | None = None,
) -> Path:
    """The export with kohya-ss names for other tools (A1111/Forge, kohya-ss, LyCORIS, diffusers)."""
    return save_lora(path, *kohya_contents(state_dict, metadata, prefix, naming))
