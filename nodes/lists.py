"""Node-boundary data shapes, in plain Python (no ComfyUI import, so tests run without it).

ComfyUI's list semantics: a node with `is_input_list=True` receives every input as a list (widget
values as one-element lists); an output with `is_output_list=True` is a list whose items
downstream nodes receive one by one. The training dataset therefore travels as
- LATENT: a list of `{"samples": Tensor[B, C, (T,) H, W]}`; B is 1 per image after Make Training
  Dataset and the bucket size after Resolution Bucket;
- CONDITIONING: a list of conditionings, each a list of `[Tensor, dict]` entries: one
  conditioning per LATENT item; for a batched item (Resolution Bucket) one entry per sample.
Flattening both in order (lora_core.data.flatten_latent_batches) gives the per-sample alignment
the engine trains on, whichever of our or ComfyUI's dataset nodes produced them. A sample's
conditioning is then a CONDITIONING holding one entry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..lora_core.data.buckets import flatten_latent_batches
from ..lora_core.errors import UserInputError


def single(value: Any) -> Any:
    """The widget value of an `is_input_list` node (a one-element list), or the value itself."""
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return value[0]
    return value


def training_samples(latents: Sequence[Any], positive: Sequence[Any]) -> tuple[list[torch.Tensor], list]:
    """(one latent [C, (T,) H, W] per sample, one CONDITIONING per sample or a single one for all).

    Accepts what our and ComfyUI's dataset nodes produce (see the module docstring), plus a
    single conditioning (e.g. one CLIP Text Encode) for every latent.
    """
    if not latents:
        raise UserInputError("The latents input is empty: connect the latents of at least one image.")
    if not positive:
        raise UserInputError("The positive input is empty: connect conditioning for the training images.")
    if len(positive) == 1 and len(latents) > 1:
        flat, _ = flatten_latent_batches(list(latents), [positive[0]] * len(latents))
        return flat, [positive[0]]
    if len(positive) != len(latents):
        latents = _split_batches_to_match(latents, len(positive))
    if len(positive) != len(latents):
        raise UserInputError(
            f"{len(latents)} latents but {len(positive)} conditionings: connect the latents and conditioning "
            f"outputs of the same Make Training Dataset / Load Training Dataset / Resolution Bucket node, or a "
            f"single conditioning for all images."
        )
    return flatten_latent_batches(list(latents), list(positive))


def _split_batches_to_match(latents: Sequence[Any], count: int) -> Sequence[Any]:
    """One LATENT per sample when the batched LATENTs hold exactly `count` samples in all.

    ComfyUI's trainer accepts one batched LATENT (e.g. from a batch of images) with one
    conditioning per image; the pairing is by position in the batch.
    """
    samples = [sample[None] for latent in latents if isinstance(latent, dict) and "samples" in latent
               for sample in latent["samples"]]
    return [{"samples": sample} for sample in samples] if len(samples) == count else latents


def conditioning_entry(cond: Any, where: str = "conditioning") -> list:
    """The single `[tensor, dict]` entry of one sample's CONDITIONING."""
    if _is_entry(cond):
        return cond
    if isinstance(cond, (list, tuple)) and len(cond) == 1 and _is_entry(cond[0]):
        return cond[0]
    if isinstance(cond, (list, tuple)) and cond and all(_is_entry(c) for c in cond):
        raise UserInputError(
            f"The {where} of one sample has {len(cond)} parts (from Conditioning Combine?): training needs one "
            f"per sample. Use Conditioning (Concat) instead, or encode one caption per image."
        )
    raise UserInputError(
        f"The {where} is a {type(cond).__name__}, not conditioning: connect the 'conditioning' output of "
        f"Make Training Dataset or a CLIP Text Encode node."
    )


def _is_entry(item: Any) -> bool:
    return (
        isinstance(item, (list, tuple))
        and len(item) == 2
        and (item[0] is None or isinstance(item[0], torch.Tensor))
        and isinstance(item[1], dict)
    )


def dedupe_by_identity(items: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """(distinct objects in first-seen order, index into them for each item).

    kohya-ss repeats travel as the same tensor object listed N times; this finds the distinct
    ones so each is encoded / written once.
    """
    distinct: list[Any] = []
    where: dict[int, int] = {}
    index = []
    for item in items:
        key = id(item)
        if key not in where:
            where[key] = len(distinct)
            distinct.append(item)
        index.append(where[key])
    return distinct, index


def next_counter(prefix_name: str, existing: Sequence[str]) -> int:
    """1 + the highest counter among `<prefix_name>[_<steps>_steps]_<NNNNN>_.safetensors` files."""
    pattern = re.compile(rf"^{re.escape(prefix_name)}_(?:\d+_steps_)?(\d{{5,}})_\.safetensors$", re.IGNORECASE)
    highest = 0
    for name in existing:
        match = pattern.match(name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def lora_file_name(prefix_name: str, steps: int | None, counter: int) -> str:
    if steps is None or steps <= 0:
        return f"{prefix_name}_{counter:05d}_.safetensors"
    return f"{prefix_name}_{steps}_steps_{counter:05d}_.safetensors"


def loss_summary(loss: Sequence[float], window: int = 10) -> dict[str, float]:
    """First / last / smoothed-last / minimum loss, for file metadata and the UI text."""
    values = [float(v) for v in loss if v is not None and math.isfinite(float(v))]
    if not values:
        return {}
    tail = values[-window:]
    return {
        "first": values[0],
        "last": values[-1],
        "last_mean": sum(tail) / len(tail),
        "min": min(values),
        "count": float(len(values)),
    }


class Throttle:
    """Says when a costly update (a chart render) is due: at most every `every_seconds`, sooner
    after `every_steps` steps (but not more than four times as often), and always first and last."""

    def __init__(self, every_steps: int = 10, every_seconds: float = 2.0):
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._last_step: int | None = None
        self._last_time = -math.inf

    def due(self, step: int, total: int, now: float) -> bool:
        if self._last_step is None or step >= total:
            return self._mark(step, now)
        elapsed = now - self._last_time
        if elapsed >= self.every_seconds or (
            step - self._last_step >= self.every_steps and elapsed >= self.every_seconds / 4
        ):
            return self._mark(step, now)
        return False

    def _mark(self, step: int, now: float) -> bool:
        self._last_step, self._last_time = step, now
        return True
