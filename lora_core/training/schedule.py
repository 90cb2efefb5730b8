"""Learning-rate schedules as plain functions of the global optimizer step.

A schedule is a pure function of (step, total) so a resumed run lands on the same multiplier
as an uninterrupted one without any scheduler state to save: warmup counts global steps (a
resumed run past warmup does not warm up again) and the decay spans the run's final step count.
"""

from __future__ import annotations

import math

from ..errors import UserInputError

LR_SCHEDULERS = ("constant", "linear", "cosine")


def check_scheduler(name: str) -> str:
    normalised = name.lower()
    if normalised not in LR_SCHEDULERS:
        raise UserInputError(f"lr_scheduler = {name!r} is not supported: choose one of {', '.join(LR_SCHEDULERS)}.")
    return normalised


def lr_multiplier(scheduler: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Factor on the base learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
