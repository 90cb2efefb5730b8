"""How the training engine sees a diffusion model.

The engine never knows whether it trains an SD1.5 UNet, a Flux transformer or a toy net: it
draws a noise level, noises the latents, asks for an x0 prediction and compares. Everything
model-specific (sigma table, input scaling, prediction type, conditioning plumbing) lives behind
this protocol; the ComfyUI glue implements it over ComfyUI's `BaseModel`, `lora_core.toy` over
tiny nets for tests and the demo.

The one invariant every implementation keeps: `denoise(x_t, sigma, conds)` equals
`c_skip * x_t + c_out * model_output` with `(c_skip, c_out) = output_coefficients(sigma)`, so the
model's own target (eps, v or flow velocity) is `(x0 - c_skip * x_t) / c_out` for every
parametrisation and the objective needs no per-model branches.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Denoiser(Protocol):
    module: nn.Module
    """The tree adapters attach to and checkpointing wraps (ComfyUI: `model.diffusion_model`)."""
    key_prefix: str
    """Prefix of LoRA file keys for `module` ("diffusion_model.")."""
    prediction_type: str
    """For display only: "eps", "v", "flow", ..."""
    device: torch.device
    """Where the forward pass runs: batches and adapters go here (with offloading, base weights
    may live elsewhere, so this is not read off the parameters)."""

    def sigma_at(self, t: Tensor, latent_shape: tuple[int, ...] | None = None) -> Tensor:
        """t in [0, 1], 1 = most noise -> sigma, one per sample. `latent_shape` is the batch's
        latent shape, for models whose noise schedule depends on the image size (Flux.1 dev)."""
        ...

    def add_noise(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor: ...

    def output_coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out), broadcastable against x_t, with denoised = c_skip*x_t + c_out*output."""
        ...

    def denoise(self, x_t: Tensor, sigma: Tensor, conds: list) -> Tensor:
        """x0 prediction; `conds` holds one opaque conditioning object per sample."""
        ...

    def prepare_latents(self, latents: Tensor) -> Tensor:
        """Into the model's latent space (ComfyUI: `process_latent_in`)."""
        ...

    # Optional (read with getattr, so not part of the runtime check):
    # `autograd_reference_ops: dict` - {op: plain-torch function} for ops the model calls that have
    # no autograd formula (fused kernels); training runs the function instead (`AutogradSafety`).


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Shape a per-sample vector [B] so it broadcasts against a batch [B, C, ...]."""
    return values.reshape(values.shape[:1] + (1,) * (like.ndim - 1))


def noising_coefficients(denoiser: Denoiser, sigma: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with add_noise(x0, noise, sigma) == a * x0 + b * noise, read off the denoiser itself.

    Every parametrisation the engine meets noises linearly, so probing with ones and zeros gives
    the signal-to-noise ratio (a / b)^2 without a per-model formula.
    """
    shape = like.shape[:1] + (1,) * (like.ndim - 1)
    ones = torch.ones(shape, dtype=torch.float32, device=like.device)
    zeros = torch.zeros_like(ones)
    sigma = sigma.to(device=like.device, dtype=torch.float32)
    return denoiser.add_noise(ones, zeros, sigma), denoiser.add_noise(zeros, ones, sigma)
