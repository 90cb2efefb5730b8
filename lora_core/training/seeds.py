"""Every random draw of a run comes from a generator seeded by (seed, purpose, position).

Nothing depends on how many draws happened before, so a run resumed at step N draws exactly what
an uninterrupted run draws at step N, and batch 4 draws per sample what 2 x 2 accumulation draws.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    text = ":".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def generator_for(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
