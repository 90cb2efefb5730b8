"""Aspect-ratio buckets: train on many image shapes without distorting them.

Each bucket keeps about the area of a square `resolution`^2 (so memory per sample stays flat)
with sides in multiples of `step`; an image goes to the bucket whose aspect ratio is nearest on a
log scale (2:1 and 1:2 are equally far from square) and is scaled to cover it, then centre-cropped.
Latents already encoded are grouped by their spatial size, as ComfyUI's ResolutionBucket does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import UserInputError
from .resize import cover_crop


@dataclass(frozen=True)
class BucketSpec:
    resolution: int = 1024      # buckets hold about resolution^2 pixels
    step: int = 64              # sides are multiples of this
    max_aspect: float = 2.0     # longest side / shortest side at most this

    def __post_init__(self) -> None:
        if self.step < 8 or self.step % 8:
            raise UserInputError(f"bucket step = {self.step} must be a multiple of 8 (64 is usual).")
        if self.resolution < self.step:
            raise UserInputError(f"bucket resolution = {self.resolution} must be at least the step ({self.step}).")
        if self.max_aspect < 1.0:
            raise UserInputError(f"max aspect ratio = {self.max_aspect} must be 1.0 or more (2.0 is usual).")


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """(width, height) of every bucket, sorted by aspect ratio (tallest first).

    For each short side on the step grid, the long side on the grid whose area is closest to the
    target (in log terms) is taken, in both orientations, so portrait and landscape buckets
    mirror each other; the square bucket is always there.
    """
    target = spec.resolution * spec.resolution
    square = max(spec.step, round(spec.resolution / spec.step) * spec.step)
    buckets = {(square, square)}
    for short in range(spec.step, square, spec.step):
        ideal = target / short
        below = max(short, int(ideal // spec.step) * spec.step)
        long = min((below, below + spec.step), key=lambda side: abs(math.log(short * side / target)))
        if long / short <= spec.max_aspect + 1e-9:
            buckets.update({(long, short), (short, long)})
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height on a log scale (ties: the first)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))


def fit_to_bucket(image: torch.Tensor, buckets: list[tuple[int, int]]) -> torch.Tensor:
    """[H, W, 3] scaled to cover its nearest bucket and centre-cropped to it."""
    width, height = nearest_bucket(image.shape[1], image.shape[0], buckets)
    return cover_crop(image, width, height)


def bucket_table(sizes: list[tuple[int, int]]) -> str:
    """A text table of (width, height) sizes and how many samples each holds."""
    counts = Counter(sizes)
    lines = ["bucket (w x h)   aspect   samples"]
    for (w, h), n in sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0])):
        lines.append(f"{w:>6} x {h:<6}   {w / h:6.2f}   {n:>7}")
    lines.append(f"{len(counts)} buckets, {sum(counts.values())} samples")
    return "\n".join(lines)


@dataclass
class LatentBucket:
    samples: torch.Tensor       # [B, C, H, W] (or [B, C, T, H, W]): the bucket's latents stacked
    conds: list                 # one conditioning per sample, same order
    indices: list[int]          # position of each sample in the input lists


def group_latents_by_size(latents: list[torch.Tensor], conds: list) -> list[LatentBucket]:
    """Per-sample latents ([C, H, W] / [C, T, H, W]) and conds grouped into same-size batches.

    Buckets come in order of first appearance, samples keep their input order inside a bucket.
    """
    if len(latents) != len(conds):
        raise UserInputError(
            f"{len(latents)} latents but {len(conds)} conditionings: give one conditioning per latent "
            f"(the outputs of one Make Training Dataset node belong together)."
        )
    groups: dict[tuple, list[int]] = {}
    for index, latent in enumerate(latents):
        groups.setdefault(tuple(latent.shape), []).append(index)
    return [LatentBucket(samples=torch.stack([latents[i] for i in idx]), conds=[conds[i] for i in idx], indices=idx)
            for idx in groups.values()]


def flatten_latent_batches(latent_batches: list, conditionings: list) -> tuple[list[torch.Tensor], list]:
    """ComfyUI lists (LATENT dicts of [B, ...] and one CONDITIONING each) -> one latent and cond per sample.

    A CONDITIONING with B entries gives each sample its own entry (ComfyUI's convention); one
    with a single entry is shared by all B samples; for B = 1 the whole CONDITIONING is the sample's.
    """
    if len(latent_batches) != len(conditionings):
        raise UserInputError(
            f"{len(latent_batches)} latent batches but {len(conditionings)} conditionings: connect the "
            f"latents and conditioning outputs of the same node."
        )
    latents: list[torch.Tensor] = []
    conds: list = []
    for position, (batch, cond) in enumerate(zip(latent_batches, conditionings)):
        samples = batch["samples"] if isinstance(batch, dict) else batch
        if samples.dim() < 4:
            raise UserInputError(
                f"Latent {position} has shape {list(samples.shape)}: expected [batch, channels, height, width]."
            )
        count = samples.shape[0]
        if count == 1:
            per_sample = [cond]
        elif len(cond) == count:
            per_sample = [[c] for c in cond]
        elif len(cond) == 1:
            per_sample = [cond] * count
        else:
            raise UserInputError(
                f"Latent {position} holds {count} samples but its conditioning has {len(cond)} entries: "
                f"give one entry per sample or a single one for all."
            )
        latents.extend(samples[i] for i in range(count))
        conds.extend(per_sample)
    return latents, conds
