"""Write encoded datasets: safetensors shards plus one `manifest.json`, never pickle (reading: dataset_reader.py).

Layout of a dataset folder:
    manifest.json                    format, version, sample count, which VAE / text encoder made it,
                                     per sample: latent shard + key + shape + dtype, caption, source
                                     file + sha256, repeats, bucket, index of its conditioning
    latents-00000.safetensors ...    one tensor per sample ("l000123"), shards of at most
                                     `shard_max_bytes` (and `shard_max_samples`, if set)
    conds-00000.safetensors ...      each distinct conditioning tensor once ("t000004")
Conditioning structure (the [tensor, dict] pairs) is JSON in the manifest, see cond_codec.py.

The folder is written to a temporary name and renamed when complete (atomic_folder.py). An
existing folder of the same name is an error unless `overwrite=True`, and even then only an
empty folder or one holding nothing but a saved dataset's files is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserInputError
from .atomic_folder import write_folder
from .cond_codec import CondEncoder
from .paths import resolve_inside

FORMAT_NAME = "comfyui-lora-trainer.dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILTIN_METADATA = "metadata.json"
_DATASET_FILE = re.compile(r"^(manifest\.json|metadata\.json|(latents|conds)-\d{5}\.safetensors|shard_\d+\.pkl)$")


@dataclass
class SampleInfo:
    caption: str = ""
    source_file: str = ""                    # image path relative to its root, "" when unknown
    source_sha256: str = ""                  # of the image file's bytes, "" when unknown
    repeats: int = 1                         # kohya-ss sampling weight
    bucket: tuple[int, int] | None = None    # (width, height) in pixels, when bucketed
    frames: int = 0                          # pixel frames of a video clip (its latent holds fewer); 0 = image / unknown


@dataclass(frozen=True)
class SaveOptions:
    vae: str = ""                            # which VAE made the latents (free text from the caller)
    text_encoder: str = ""                   # which text encoder made the conditioning
    shard_max_bytes: int = 256 * 1024 * 1024
    shard_max_samples: int = 0               # 0: no limit by count
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.shard_max_bytes < 1:
            raise UserInputError(f"shard size = {self.shard_max_bytes} bytes must be at least 1 (256 MB is usual).")
        if self.shard_max_samples < 0:
            raise UserInputError(f"samples per shard = {self.shard_max_samples} must be 0 (no limit) or more.")


@dataclass
class DatasetSamples:
    """What the engine trains on: index-aligned latents, conditionings and per-sample info.

    Samples that share a caption share one conditioning object; treat it as read-only.
    """
    latents: list[torch.Tensor]              # each [C, H, W] (or [C, T, H, W])
    conds: list                              # each a ComfyUI CONDITIONING: list of [tensor, dict]
    info: list[SampleInfo]
    vae: str = ""
    text_encoder: str = ""
    source_format: str = FORMAT_NAME

    @property
    def weights(self) -> list[float]:
        return [float(i.repeats) for i in self.info]

    def to_comfy(self) -> tuple[list[dict], list]:
        """(LATENT dicts with a batch of 1, CONDITIONING per sample): the lists ComfyUI nodes pass on."""
        return [{"samples": latent.unsqueeze(0)} for latent in self.latents], list(self.conds)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, to tell later which exact image a latent came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_saved_dataset(folder: str | os.PathLike) -> bool:
    """True for a folder holding our manifest or ComfyUI's built-in dataset layout."""
    folder = Path(folder)
    return (folder / MANIFEST).is_file() or (folder / BUILTIN_METADATA).is_file() or any(folder.glob("shard_*.pkl"))


def holds_only_dataset_files(folder: str | os.PathLike) -> bool:
    """True when replacing `folder` can lose nothing but a saved dataset (ours or the built-in kind)."""
    names = [entry.name for entry in os.scandir(folder)]
    if not names or not is_saved_dataset(folder):
        return not names
    return all(_DATASET_FILE.match(name) for name in names)


def save_dataset(root: str | os.PathLike, name: str, latents: list[torch.Tensor], conds: list,
                 info: list[SampleInfo] | None = None, options: SaveOptions | None = None) -> Path:
    """Write `root/name` as a dataset folder and return its path.

    `conds` holds one conditioning per latent, or a single one shared by all; `info` one entry per
    latent or None. Everything is checked before the first byte is written.
    """
    options = options or SaveOptions()
    folder = _dataset_folder(root, name)
    shown = f"Dataset folder {Path(root).name}/{folder.relative_to(root).as_posix()}/"
    count = len(latents)
    if count == 0:
        raise UserInputError("The dataset is empty: connect the latents from Make Training Dataset.")
    if len(conds) == 1 and count > 1:
        conds = list(conds) * count
    if len(conds) != count:
        raise UserInputError(
            f"{count} latents but {len(conds)} conditionings: give one conditioning per latent or one for all."
        )
    info = info if info is not None else [SampleInfo() for _ in range(count)]
    if len(info) != count:
        raise UserInputError(f"{count} latents but {len(info)} sample infos (captions): give one per latent.")
    for index, latent in enumerate(latents):
        if not isinstance(latent, torch.Tensor) or latent.dim() < 3:
            got = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise UserInputError(
                f"Latent {index} is {got}: expected one sample [channels, height, width]; split batches first."
            )
        if info[index].frames < 0:
            raise UserInputError(f"Sample {index} has frames = {info[index].frames}: it must be 0 (unknown) or more.")
        if info[index].repeats < 1:
            raise UserInputError(f"Sample {index} has repeats = {info[index].repeats}: it must be 1 or more.")

    encoder = CondEncoder()
    distinct: dict[str, int] = {}
    structures: list = []
    cond_index: list[int] = []
    for index, cond in enumerate(conds):
        text = json.dumps(encoder.encode(cond, f"Conditioning of sample {index}"), sort_keys=True)
        if text not in distinct:
            distinct[text] = len(structures)
            structures.append(json.loads(text))
        cond_index.append(distinct[text])

    latent_shards = _split(
        [_nbytes(t) for t in latents], options.shard_max_bytes, options.shard_max_samples)
    cond_keys = list(encoder.tensors)
    cond_shards = _split([_nbytes(encoder.tensors[k]) for k in cond_keys], options.shard_max_bytes, 0)

    samples = []
    for shard_no, (start, stop) in enumerate(latent_shards):
        for index in range(start, stop):
            entry = asdict(info[index])
            entry["bucket"] = list(entry["bucket"]) if entry["bucket"] is not None else None
            entry.update(latent_shard=shard_no, latent_key=f"l{index:06d}",
                         latent_shape=list(latents[index].shape),
                         latent_dtype=str(latents[index].dtype).removeprefix("torch."),
                         cond=cond_index[index])
            samples.append(entry)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sample_count": count,
        "vae": options.vae,
        "text_encoder": options.text_encoder,
        "latent_shards": [f"latents-{i:05d}.safetensors" for i in range(len(latent_shards))],
        "cond_shards": [f"conds-{i:05d}.safetensors" for i in range(len(cond_shards))],
        "conds": structures,
        "samples": samples,
    }
    shard_meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}

    def write(partial: Path) -> None:
        for shard_no, (start, stop) in enumerate(latent_shards):
            tensors = {f"l{i:06d}": _standalone(latents[i]) for i in range(start, stop)}
            save_file(tensors, str(partial / manifest["latent_shards"][shard_no]), metadata=shard_meta)
        for shard_no, (start, stop) in enumerate(cond_shards):
            tensors = {k: _standalone(encoder.tensors[k]) for k in cond_keys[start:stop]}
            save_file(tensors, str(partial / manifest["cond_shards"][shard_no]), metadata=shard_meta)
        with open(partial / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)

    return write_folder(folder, write, options.overwrite, holds_only_dataset_files, shown)


def _dataset_folder(root: str | os.PathLike, name: str) -> Path:
    folder = resolve_inside(root, name, what="dataset folder")
    if os.path.realpath(folder) == os.path.realpath(root):
        raise UserInputError(f"The dataset folder must be a subfolder of {root}, e.g. 'my_dataset'.")
    return folder


def existing_dataset_folder(root: str | os.PathLike, name: str) -> Path:
    folder = _dataset_folder(root, name)
    if not folder.is_dir():
        raise UserInputError(
            f"Dataset folder {Path(root).name}/{name} does not exist: save a dataset there first or pick another."
        )
    return folder


def _split(sizes: list[int], max_bytes: int, max_count: int) -> list[tuple[int, int]]:
    """[start, stop) ranges: consecutive items up to max_bytes (and max_count); at least one each."""
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        full = total + size > max_bytes or (max_count and index - start >= max_count)
        if index > start and full:
            ranges.append((start, index))
            start, total = index, 0
        total += size
    if sizes:
        ranges.append((start, len(sizes)))
    return ranges


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes: safetensors refuses views that share storage."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.untyped_storage().nbytes() != _nbytes(tensor) or tensor.storage_offset():
        tensor = tensor.clone()
    return tensor
