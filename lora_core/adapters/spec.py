"""What the user asks for: the algorithm and its size. Validates itself on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserInputError

ALGORITHMS = ("lora", "loha", "lokr", "oft")


@dataclass
class AdapterSpec:
    algorithm: str = "lora"
    rank: int = 8
    # LoRA / LoHa / LoKr (low-rank factor): scale = alpha / rank. OFT: alpha is the norm
    # constraint of the skew-symmetric blocks (0 = none), as in ComfyUI's loader.
    alpha: float = 1.0
    lokr_factor: int = -1
    oft_block_size: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.algorithm = str(self.algorithm).lower()
        if self.algorithm not in ALGORITHMS:
            raise UserInputError(
                f"Unknown adapter algorithm '{self.algorithm}' (parameter 'algorithm'): "
                f"choose one of {', '.join(ALGORITHMS)}."
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserInputError(f"rank must be a whole number >= 1 (parameter 'rank'), got {self.rank!r}.")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise UserInputError(
                f"alpha must be a finite number >= 0 (parameter 'alpha'), got {self.alpha!r}."
            )
        if not isinstance(self.lokr_factor, int) or (self.lokr_factor == 0 or self.lokr_factor < -1):
            raise UserInputError(
                f"lokr_factor must be -1 (balanced) or a whole number >= 1, got {self.lokr_factor!r}."
            )
        if not isinstance(self.oft_block_size, int) or self.oft_block_size < 2:
            raise UserInputError(
                f"oft_block_size must be a whole number >= 2 (parameter 'oft_block_size'), "
                f"got {self.oft_block_size!r}."
            )
