"""Mixed precision for the forward pass: autocast dtype, and loss scaling where fp16 needs it.

Adapter parameters stay float32 whatever the setting (optimizer updates smaller than a bf16 ulp
would otherwise vanish); only the forward runs in the chosen dtype. "none" runs the model in the
dtype it already has, which is what quantized base weights with bypass adapters need.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserInputError

TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "none": None}


def check_training_dtype(name: str) -> str:
    normalised = name.lower()
    if normalised not in TRAINING_DTYPES:
        raise UserInputError(
            f"training_dtype = {name!r} is not supported: choose one of {', '.join(TRAINING_DTYPES)}."
        )
    return normalised


class Precision:
    def __init__(self, training_dtype: str, device: torch.device):
        self.dtype = TRAINING_DTYPES[check_training_dtype(training_dtype)]
        self.device_type = device.type
        # fp16 gradients underflow without scaling; bf16 has float32's range and needs none.
        # (CPU too: rare, but it keeps this path exercised by the CPU tests.)
        self.scaler = (
            torch.amp.GradScaler(device.type)
            if self.dtype == torch.float16 and device.type in ("cuda", "cpu")
            else None
        )

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
