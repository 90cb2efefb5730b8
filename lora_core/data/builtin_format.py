"""Read datasets written by ComfyUI's built-in Save Training Dataset node.

Its layout (comfy_extras/nodes_dataset.py): `shard_0000.pkl`, `shard_0001.pkl`, ... each a
torch.save of {"latents": [{"samples": Tensor[B, C, H, W]}, ...], "conditioning": [CONDITIONING,
...]}, plus `metadata.json` {"num_samples", "num_shards", "shard_size"}. The shards are read with
`torch.load(weights_only=True)` only, which refuses anything but tensors and plain data, so a
shard from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import UserInputError
from .buckets import flatten_latent_batches
from .saved_dataset import BUILTIN_METADATA, DatasetSamples, SampleInfo
from .scan import natural_key

BUILTIN_FORMAT_NAME = "comfyui-builtin.SaveTrainingDataset"


def load_builtin_dataset(folder: Path) -> DatasetSamples:
    folder = Path(folder)
    shards = sorted(folder.glob("shard_*.pkl"), key=lambda p: natural_key(p.name))
    metadata = _read_metadata(folder)
    if metadata is not None:
        expected = metadata.get("num_shards")
        names = {p.name for p in shards}
        missing = [f"shard_{i:04d}.pkl" for i in range(expected or 0) if f"shard_{i:04d}.pkl" not in names]
        if missing:
            raise UserInputError(
                f"{folder.name}/ is missing {', '.join(missing[:5])} listed in {BUILTIN_METADATA}: the dataset is "
                f"incomplete; copy the whole folder or save it again."
            )
    if not shards:
        raise UserInputError(
            f"{folder.name}/ has no shard_*.pkl files and no manifest.json: pick a folder written by "
            f"Save Training Dataset."
        )
    latents: list[torch.Tensor] = []
    conds: list = []
    for shard in shards:
        data = _load_shard(shard)
        shard_latents, shard_conds = flatten_latent_batches(data["latents"], data["conditioning"])
        latents.extend(shard_latents)
        conds.extend(shard_conds)
    if metadata is not None and metadata.get("num_samples") not in (None, len(latents)):
        raise UserInputError(
            f"{folder.name}/{BUILTIN_METADATA} says {metadata['num_samples']} samples but the shards hold "
            f"{len(latents)}: the dataset is incomplete or mixed; save it again."
        )
    return DatasetSamples(latents=latents, conds=conds, info=[SampleInfo() for _ in latents],
                          source_format=BUILTIN_FORMAT_NAME)


def _read_metadata(folder: Path) -> dict | None:
    path = folder / BUILTIN_METADATA
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{folder.name}/{BUILTIN_METADATA} is damaged ({err}): save the dataset again.") from err
    if not isinstance(metadata, dict):
        raise UserInputError(f"{folder.name}/{BUILTIN_METADATA} is not a dataset description: save the dataset again.")
    return metadata


def _load_shard(path: Path) -> dict:
    shown = f"{path.parent.name}/{path.name}"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserInputError(
            f"{shown} holds objects other than tensors and plain data, so it is not loaded (it could run "
            f"code): re-create the dataset with Make Training Dataset and save it again."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserInputError(f"{shown} cannot be read ({err}): the file is damaged; save the dataset again.") from err
    if not isinstance(data, dict) or "latents" not in data or "conditioning" not in data:
        raise UserInputError(
            f"{shown} is not a Save Training Dataset shard (no 'latents' and 'conditioning'): pick another folder."
        )
    return data
