"""Open a saved dataset folder: check the manifest and shards, then read samples (lazily or all).

Every problem a copied, truncated or mismatched folder can have is a UserInputError that names
the file and says how to fix it; tensors come memory-mapped from the safetensors shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserInputError
from .cond_codec import decode
from .saved_dataset import FORMAT_NAME, FORMAT_VERSION, MANIFEST, DatasetSamples, SampleInfo, existing_dataset_folder


class DatasetReader:
    """A saved dataset opened lazily: tensors are read from the memory-mapped shards on access.

    Use as a context manager (or call `close`) to release the files.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._latent_files = [_open_shard(self.folder, f) for f in self.manifest["latent_shards"]]
        cond_files = [_open_shard(self.folder, f) for f in self.manifest["cond_shards"]]
        tensors: dict[str, torch.Tensor] = {}
        for handle in cond_files:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        self._conds = [decode(s, tensors, f"Conditioning {i}") for i, s in enumerate(self.manifest["conds"])]
        self.info = [_sample_info(s) for s in self.manifest["samples"]]

    def __len__(self) -> int:
        return self.manifest["sample_count"]

    def latent(self, index: int) -> torch.Tensor:
        sample = self.manifest["samples"][index]
        shard_name = self.manifest["latent_shards"][sample["latent_shard"]]
        handle = self._latent_files[sample["latent_shard"]]
        try:
            tensor = handle.get_tensor(sample["latent_key"])
        except SafetensorError as err:
            raise UserInputError(
                f"Sample {index} ({sample['latent_key']}) is missing from {self.folder.name}/{shard_name}: "
                f"the dataset is incomplete; save it again."
            ) from err
        expected = (list(sample["latent_shape"]), sample["latent_dtype"])
        found = (list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        if found != expected:
            raise UserInputError(
                f"Sample {index} in {self.folder.name}/{shard_name} is {found[0]} {found[1]}, but manifest.json "
                f"says {expected[0]} {expected[1]}: the shard does not belong to this manifest; save the "
                f"dataset again."
            )
        return tensor

    def cond(self, index: int):
        return self._conds[self.manifest["samples"][index]["cond"]]

    def read_all(self) -> DatasetSamples:
        return DatasetSamples(
            latents=[self.latent(i) for i in range(len(self))],
            conds=[self.cond(i) for i in range(len(self))],
            info=list(self.info),
            vae=self.manifest.get("vae", ""),
            text_encoder=self.manifest.get("text_encoder", ""),
        )

    def close(self) -> None:
        self._latent_files = []

    def __enter__(self) -> "DatasetReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dataset(root: str | os.PathLike, name: str) -> DatasetReader:
    return DatasetReader(existing_dataset_folder(root, name))


def load_dataset(root: str | os.PathLike, name: str) -> DatasetSamples:
    """Every sample of the dataset `root/name` written by `save_dataset`."""
    with open_dataset(root, name) as reader:
        return reader.read_all()


def read_manifest(folder: Path) -> dict:
    """The checked manifest of `folder`; every problem is a UserInputError naming the fix."""
    path = Path(folder) / MANIFEST
    shown = f"{Path(folder).name}/{MANIFEST}"
    if not path.is_file():
        raise UserInputError(
            f"{Path(folder).name}/ has no {MANIFEST}: pick a folder written by Save Training Dataset, "
            f"or save the dataset again."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{shown} is damaged ({err}): save the dataset again.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserInputError(f"{shown} is not a dataset manifest of this node pack: pick another folder.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise UserInputError(f"{shown} has no valid format_version: the file is damaged; save the dataset again.")
    if version > FORMAT_VERSION:
        raise UserInputError(
            f"{shown} is format version {version}, newer than this node pack reads (up to {FORMAT_VERSION}): "
            f"update the node pack."
        )
    required = ("sample_count", "latent_shards", "cond_shards", "conds", "samples")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise UserInputError(f"{shown} lacks {', '.join(missing)}: the file is damaged; save the dataset again.")
    if manifest["sample_count"] != len(manifest["samples"]):
        raise UserInputError(
            f"{shown} says {manifest['sample_count']} samples but lists {len(manifest['samples'])}: "
            f"the file is damaged; save the dataset again."
        )
    for index, sample in enumerate(manifest["samples"]):
        if not (0 <= sample.get("latent_shard", -1) < len(manifest["latent_shards"])
                and 0 <= sample.get("cond", -1) < len(manifest["conds"])):
            raise UserInputError(f"{shown}: sample {index} points to no shard or conditioning; save the dataset again.")
    for shard in manifest["latent_shards"] + manifest["cond_shards"]:
        if Path(shard).name != shard or not (Path(folder) / shard).is_file():
            raise UserInputError(
                f"Shard {Path(folder).name}/{shard} listed in {MANIFEST} is missing: the dataset is "
                f"incomplete (copied only in part?); copy the whole folder or save the dataset again."
            )
    return manifest


def _open_shard(folder: Path, name: str):
    try:
        return safe_open(str(folder / name), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserInputError(
            f"Shard {folder.name}/{name} cannot be read ({err}): the file is damaged; save the dataset again."
        ) from err


def _sample_info(entry: dict) -> SampleInfo:
    bucket = entry.get("bucket")
    return SampleInfo(caption=entry.get("caption", ""), source_file=entry.get("source_file", ""),
                      source_sha256=entry.get("source_sha256", ""), repeats=int(entry.get("repeats", 1)),
                      bucket=tuple(bucket) if bucket is not None else None, frames=int(entry.get("frames", 0)))


