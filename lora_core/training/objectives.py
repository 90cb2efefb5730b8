"""What a training step minimises: one small object with a `loss` method.

A sample's loss is: draw t, map it to the model's sigma, noise x0, ask the denoiser for x0,
compare in the chosen space. The "native" space is the model's own target,
`(x0 - c_skip*x_t) / c_out`, which is eps for eps models, v for v models and the velocity for
flow models, so one formula serves all of them (see `denoiser.py`). "x0" compares denoised
latents directly, as ComfyUI's built-in trainer does.

Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556) gives every noise level the
x0-space weight min(SNR, gamma). Expressed in the native space that is min(SNR, gamma) * c_out^2,
which is min(SNR, gamma)/SNR for eps and min(SNR, gamma)/(SNR+1) for v, the paper's formulas,
and follows for any other parametrisation; SNR comes from the denoiser's own noising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoiser import Denoiser, noising_coefficients, per_sample
from ..errors import UserInputError

TARGETS = ("native", "x0")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shifted")
LOSS_WEIGHTINGS = ("none", "min_snr")
LOSS_FUNCTIONS = ("mse", "l1", "huber", "smooth_l1")

# Keep t off the exact ends: at t = 0 a flow model's c_out is 0 and the native target undefined.
T_MIN = 1e-3


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    normalised = value.lower().replace("-", "_")
    if normalised == "smoothl1":
        normalised = "smooth_l1"
    if normalised not in allowed:
        raise UserInputError(f"{name} = {value!r} is not supported: choose one of {', '.join(allowed)}.")
    return normalised


@dataclass
class ObjectiveConfig:
    target: str = "native"
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    shift: float = 3.0
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    loss_function: str = "mse"
    huber_delta: float = 1.0
    noise_offset: float = 0.0
    # Train only at noise levels in [min, max]: sigma / the model's largest sigma, which for flow
    # models is sigma itself (musubi-tuner's timestep / 1000). Wan 2.2 14B trains one expert per
    # range: high noise [0.875, 1] (T2V; I2V 0.9), low noise [0, 0.875].
    min_noise_level: float = 0.0
    max_noise_level: float = 1.0

    def __post_init__(self):
        self.target = _choice("target", self.target, TARGETS)
        self.timestep_sampling = _choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        self.loss_weighting = _choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        self.loss_function = _choice("loss_function", self.loss_function, LOSS_FUNCTIONS)
        positive = {
            "logit_normal_std": self.logit_normal_std,
            "shift": self.shift,
            "min_snr_gamma": self.min_snr_gamma,
            "huber_delta": self.huber_delta,
        }
        for name, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise UserInputError(f"{name} = {value} must be a positive number.")
        if not math.isfinite(self.logit_normal_mean):
            raise UserInputError(f"logit_normal_mean = {self.logit_normal_mean} must be a finite number.")
        if not (0.0 <= self.min_noise_level < self.max_noise_level <= 1.0):
            raise UserInputError(
                f"The noise-level range [{self.min_noise_level}, {self.max_noise_level}] is empty or outside [0, 1]: "
                "use 0 <= min_noise_level < max_noise_level <= 1 (Wan 2.2 high-noise expert: 0.875 and 1; "
                "low-noise expert: 0 and 0.875).")
        if not math.isfinite(self.noise_offset) or self.noise_offset < 0:
            raise UserInputError(f"noise_offset = {self.noise_offset} must be 0 (off) or a small positive number such as 0.05.")


def sample_timesteps(config: ObjectiveConfig, count: int, generator: torch.Generator) -> Tensor:
    """t in [T_MIN, 1], 1 = most noise, drawn on CPU so the stream does not depend on the device."""
    if config.timestep_sampling == "logit_normal":
        normal = torch.randn(count, generator=generator)
        t = torch.sigmoid(normal * config.logit_normal_std + config.logit_normal_mean)
    else:
        t = torch.rand(count, generator=generator)
        if config.timestep_sampling == "shifted":
            # The SD3 / Flux resolution shift: more steps at high noise for shift > 1.
            t = config.shift * t / (1 + (config.shift - 1) * t)
    return t.clamp(T_MIN, 1.0)


def elementwise_loss(config: ObjectiveConfig, prediction: Tensor, target: Tensor) -> Tensor:
    if config.loss_function == "mse":
        return F.mse_loss(prediction, target, reduction="none")
    if config.loss_function == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if config.loss_function == "huber":
        return F.huber_loss(prediction, target, reduction="none", delta=config.huber_delta)
    return F.smooth_l1_loss(prediction, target, reduction="none", beta=config.huber_delta)


def noise_level_bounds(denoiser: Denoiser, low: float, high: float, latent_shape: tuple[int, ...]) -> tuple[float, float]:
    """(t_low, t_high): the t whose noise level sigma(t) / sigma(1) is `low` / `high`, by bisection
    (sigma grows with t for every model family)."""
    top = float(denoiser.sigma_at(torch.ones(1), latent_shape)[0])

    def t_for(level: float) -> float:
        if level <= 0.0:
            return 0.0
        if level >= 1.0:
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if float(denoiser.sigma_at(torch.tensor([mid]), latent_shape)[0]) / top < level:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return t_for(low), t_for(high)


class Objective:
    def __init__(self, config: ObjectiveConfig | None = None):
        self.config = config or ObjectiveConfig()
        self._bounds: dict[tuple, tuple[float, float]] = {}

    def restrict(self, denoiser: Denoiser, t: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        """t in [0, 1] mapped linearly onto the t range of the configured noise levels (identity
        for the full range), so the drawn distribution keeps its shape inside the range."""
        low, high = self.config.min_noise_level, self.config.max_noise_level
        if low <= 0.0 and high >= 1.0:
            return t
        key = (id(denoiser), tuple(latent_shape[1:]))
        if key not in self._bounds:
            self._bounds[key] = noise_level_bounds(denoiser, low, high, tuple(latent_shape))
        t_low, t_high = self._bounds[key]
        return t_low + (t_high - t_low) * t

    def draw(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t, noise) for a batch, from `generator` on CPU; the caller moves them to the device."""
        t = sample_timesteps(self.config, x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        if self.config.noise_offset > 0:
            # Per-sample, per-channel constant: lets the model learn overall brightness shifts.
            offset_shape = x0.shape[:2] + (1,) * (x0.ndim - 2)
            noise = noise + self.config.noise_offset * torch.randn(offset_shape, generator=generator)
        return t, noise

    def loss(self, denoiser: Denoiser, x0: Tensor, conds: list, generator: torch.Generator) -> Tensor:
        t, noise = self.draw(x0, generator)
        return self.loss_at(denoiser, x0, conds, t.to(x0.device), noise.to(x0.device))

    def loss_at(self, denoiser: Denoiser, x0: Tensor, conds: list, t: Tensor, noise: Tensor) -> Tensor:
        """Per-sample loss [B] at given timesteps and noise (validation uses a fixed grid)."""
        x0 = x0.float()
        t = self.restrict(denoiser, t, tuple(x0.shape))
        sigma = denoiser.sigma_at(t, tuple(x0.shape))
        x_t = denoiser.add_noise(x0, noise.float(), sigma)
        denoised = denoiser.denoise(x_t, sigma, conds).float()
        if self.config.target == "x0":
            prediction, target = denoised, x0
        else:
            c_skip, c_out = (per_sample(c, x0) for c in denoiser.output_coefficients(sigma))
            prediction, target = (denoised - c_skip * x_t) / c_out, (x0 - c_skip * x_t) / c_out
        per_sample_loss = elementwise_loss(self.config, prediction, target).flatten(1).mean(dim=1)
        return per_sample_loss * self.weights(denoiser, sigma, x0)

    def weights(self, denoiser: Denoiser, sigma: Tensor, x0: Tensor) -> Tensor:
        if self.config.loss_weighting == "none":
            return torch.ones(x0.shape[0], device=x0.device)
        signal, noise_scale = (c.flatten() for c in noising_coefficients(denoiser, sigma, x0))
        snr = (signal / noise_scale) ** 2
        x0_space_weight = snr.clamp(max=self.config.min_snr_gamma)
        if self.config.target == "x0":
            return x0_space_weight
        _, c_out = denoiser.output_coefficients(sigma.to(x0.device))
        return x0_space_weight * c_out.float().flatten() ** 2
