"""One entry point for every dataset folder a user may pick: ours or ComfyUI's built-in format."""

from __future__ import annotations

import os
from pathlib import Path

from .builtin_format import load_builtin_dataset
from .dataset_reader import load_dataset
from .saved_dataset import BUILTIN_METADATA, MANIFEST, DatasetSamples, existing_dataset_folder


def load_training_dataset(root: str | os.PathLike, name: str) -> DatasetSamples:
    """`root/name` read as our format when it has a manifest.json, else as the built-in shard_*.pkl format."""
    folder = existing_dataset_folder(root, name)
    builtin = (folder / BUILTIN_METADATA).is_file() or any(folder.glob("shard_*.pkl"))
    if builtin and not (folder / MANIFEST).is_file():
        return load_builtin_dataset(folder)
    return load_dataset(root, name)


def list_dataset_folders(root: str | os.PathLike) -> list[str]:
    """Relative names of the dataset folders under `root` (either format), for a combo box.

    The walk does not descend into a dataset, skips hidden folders and never leaves `root`.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        return []
    real_root = os.path.realpath(root_path)
    found = []
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if Path(dirpath) == root_path:
            continue
        if MANIFEST in filenames or BUILTIN_METADATA in filenames or any(
                f.startswith("shard_") and f.endswith(".pkl") for f in filenames):
            if os.path.realpath(dirpath).startswith(real_root + os.sep):
                found.append(Path(dirpath).relative_to(root_path).as_posix())
            dirnames[:] = []
    return sorted(found)
