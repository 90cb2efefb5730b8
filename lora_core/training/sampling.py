"""When a run renders sample images, and with which seed: the schedule, in plain Python.

The images themselves are drawn by the host (ComfyUI's sampler, in the node glue); this module only
decides the steps and the seeds, so the same decision holds for every host and is tested without one.

Invariants:
- Steps are global (a resumed run counts on from the steps already done), so a run of N steps and
  a run of N/2 steps resumed for N/2 more sample at the same steps.
- Every checkpoint (`save_every_steps`) has a sample row at its step, and so does the last step,
  so the user can pick the file whose samples looked best.
- Prompt k always draws its noise from `prompt_seed(seed, k)`: the same weights give the same
  picture in any run, and the seed written into the file is the one KSampler needs to redraw it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserInputError

SEED_MODULUS = 2**64


@dataclass(frozen=True)
class SampleSchedule:
    every_steps: int = 0  # sample at the global multiples of this; 0 = only at checkpoints and the end
    at_start: bool = False  # also before the first step of the run (the starting weights)
    checkpoint_every: int = 0  # save_every_steps of the run: each checkpoint gets a row

    def __post_init__(self):
        for name in ("every_steps", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserInputError(f"{name} must be a whole number >= 0, got {value!r}.")

    def due(self, step: int, start: int, total: int) -> bool:
        """Whether the weights after global `step` are sampled in a run going from `start` to `total`."""
        if step == start:
            return self.at_start
        if not start < step <= total:
            return False
        return (step == total
                or (self.every_steps > 0 and step % self.every_steps == 0)
                or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0))

    def steps(self, start: int, total: int) -> list[int]:
        """Every sampled step of the run, in order: the rows of the sample grid."""
        return [step for step in range(start, total + 1) if self.due(step, start, total)]


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The noise seed of prompt `prompt_index`: seed, seed + 1, ... (as KSampler takes it)."""
    return (int(seed) + int(prompt_index)) % SEED_MODULUS


def sample_file_name(step: int, prompt_index: int) -> str:
    return f"step_{step}_{prompt_index}.png"
