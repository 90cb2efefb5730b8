"""Tiny caption-conditioned denoisers for the demo and the tests.

A few thousand parameters, but laid out like a real diffusion model (conv in/out, a time
embedding, a `blocks` list of transformer blocks with `attn.to_q/to_k/to_v/to_out.0` and
`ff.net.0/ff.net.2`), so target presets, block checkpointing and file keys meet the names they
meet in ComfyUI. The caption reaches the image only through cross-attention (with fixed 2-D
positions on the image tokens, so a caption can place things), so a trainer that hands a sample
someone else's caption measurably learns the wrong thing.

Three parametrisations, each written as ComfyUI's `model_sampling` does it:
- "eps": x_t = x0 + sigma * noise with SD1.5's discrete sigmas, input scaled by 1/sqrt(sigma^2+1),
  denoised = x_t - sigma * output.
- "v": same noising, k-diffusion v (sigma_data = 1): denoised = x_t/(sigma^2+1) - sigma/sqrt(sigma^2+1) * output.
- "flow": x_t = (1 - sigma) x0 + sigma noise, sigma = t, denoised = x_t - sigma * output (velocity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .training.denoiser import per_sample
from .errors import UserInputError
from .training.loop import TrainingData

PARAMETRISATIONS = ("eps", "v", "flow")


@dataclass(frozen=True)
class ToyNetConfig:
    latent_channels: int = 4
    width: int = 16
    depth: int = 2
    cond_dim: int = 8
    time_features: int = 8


class CrossAttention(nn.Module):
    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(cond_dim, width, bias=False)
        self.to_v = nn.Linear(cond_dim, width, bias=False)
        self.to_out = nn.Sequential(nn.Linear(width, width))

    def forward(self, tokens: Tensor, context: Tensor) -> Tensor:
        q, k, v = self.to_q(tokens), self.to_k(context), self.to_v(context)
        return self.to_out(F.scaled_dot_product_attention(q, k, v))


class FeedForward(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)


class ToyBlock(nn.Module):
    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(width, cond_dim)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width)

    def forward(self, tokens: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        tokens = tokens + emb[:, None, :]
        tokens = tokens + self.attn(self.norm1(tokens), context)
        return tokens + self.ff(self.norm2(tokens))


class ToyNet(nn.Module):
    """The raw network: (scaled input, noise feature, caption tokens) -> model output."""

    def __init__(self, config: ToyNetConfig):
        super().__init__()
        self.config = config
        c, w = config.latent_channels, config.width
        self.conv_in = nn.Conv2d(c, w, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(config.time_features, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(ToyBlock(w, config.cond_dim) for _ in range(config.depth))
        self.norm_out = nn.GroupNorm(4, w)
        self.conv_out = nn.Conv2d(w, c, 3, padding=1)

    def forward(self, x: Tensor, noise_feature: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        half = self.config.time_features // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -math.log(100.0) / half)
        angles = noise_feature.float()[:, None] * freqs[None, :] * 10.0
        emb = self.time_embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        tokens = self.conv_in(x).flatten(2).transpose(1, 2) + position_features(h, w, self.config.width, x.device)
        for block in self.blocks:
            tokens = block(tokens, emb, context)
        features = tokens.transpose(1, 2).reshape(b, -1, h, w)
        return self.conv_out(F.silu(self.norm_out(features)))


def position_features(h: int, w: int, width: int, device: torch.device) -> Tensor:
    """Fixed 2-D sinusoidal positions [h*w, width], so a caption can say *where* things go."""
    per_axis = width // 4
    freqs = torch.pi * 2.0 ** torch.arange(per_axis, device=device, dtype=torch.float32) / 2
    ys, xs = torch.meshgrid(
        torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device), indexing="ij"
    )
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)
    features = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(features, (0, width - features.shape[1]))


def discrete_vp_sigmas(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """SD1.5's "scaled linear" beta schedule expressed as k-diffusion sigmas."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


class ToyDenoiser:
    """`Denoiser` over a `ToyNet` in one of the three parametrisations."""

    key_prefix = "diffusion_model."

    def __init__(self, net: ToyNet, prediction_type: str = "eps", latent_scale: float = 1.0):
        if prediction_type not in PARAMETRISATIONS:
            raise UserInputError(
                f"prediction_type {prediction_type!r} is not known: use one of {', '.join(PARAMETRISATIONS)}."
            )
        self.module = net
        self.prediction_type = prediction_type
        self.latent_scale = latent_scale
        self.sigmas = discrete_vp_sigmas()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def sigma_at(self, t: Tensor, latent_shape: tuple[int, ...] | None = None) -> Tensor:
        t = t.float().clamp(0.0, 1.0)
        if self.prediction_type == "flow":
            return t
        # Interpolate log-sigma over the discrete table, as ComfyUI's ModelSamplingDiscrete does.
        log_sigmas = self.sigmas.to(t.device).log()
        position = t * (len(log_sigmas) - 1)
        low = position.floor().long().clamp(max=len(log_sigmas) - 2)
        frac = position - low
        return (log_sigmas[low] * (1 - frac) + log_sigmas[low + 1] * frac).exp()

    def add_noise(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        s = per_sample(sigma, x0)
        if self.prediction_type == "flow":
            return (1 - s) * x0 + s * noise
        return x0 + s * noise

    def output_coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        s = sigma.float()
        if self.prediction_type == "v":
            return 1.0 / (s**2 + 1.0), -s / (s**2 + 1.0).sqrt()
        return torch.ones_like(s), -s

    def denoise(self, x_t: Tensor, sigma: Tensor, conds: list) -> Tensor:
        if len(conds) != x_t.shape[0]:
            raise ValueError(f"{len(conds)} conditionings for a batch of {x_t.shape[0]}")
        context = torch.stack([c if c.ndim == 2 else c[None] for c in conds]).to(x_t.device, torch.float32)
        sigma = sigma.to(x_t.device, torch.float32)
        if self.prediction_type == "flow":
            model_in, noise_feature = x_t, sigma
        else:
            model_in, noise_feature = x_t / per_sample((sigma**2 + 1.0).sqrt(), x_t), sigma.log() / 4.0
        output = self.module(model_in, noise_feature, context).float()
        c_skip, c_out = self.output_coefficients(sigma)
        return per_sample(c_skip, x_t) * x_t.float() + per_sample(c_out, x_t) * output

    def prepare_latents(self, latents: Tensor) -> Tensor:
        return latents * self.latent_scale


def make_toy_denoiser(prediction_type: str = "eps", seed: int = 0, config: ToyNetConfig | None = None) -> ToyDenoiser:
    """A freshly initialised toy denoiser; `seed` fixes the weights without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyNet(config or ToyNetConfig())
    net.requires_grad_(False)
    return ToyDenoiser(net, prediction_type)


def make_caption_embeddings(count: int, seed: int = 0, tokens: int = 4, cond_dim: int = 8) -> list[Tensor]:
    """One random "caption" per sample: a few tokens of `cond_dim` features."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, cond_dim, generator=generator) for _ in range(count)]


def make_shape_images(count: int, size: int = 32, seed: int = 0) -> list[Tensor]:
    """Coloured discs and squares on plain backgrounds, [3, size, size] in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for index in range(count):
        background, colour = torch.rand(3, generator=generator) * 0.5, torch.rand(3, generator=generator)
        cx, cy = (torch.rand(2, generator=generator) * size * 0.5 + size * 0.25).tolist()
        radius = size * (0.15 + 0.15 * torch.rand(1, generator=generator).item())
        if index % 2 == 0:
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        else:
            mask = ((xs - cx).abs() <= radius) & ((ys - cy).abs() <= radius)
        image = background[:, None, None].expand(3, size, size).clone()
        image[:, mask] = colour[:, None]
        images.append(image)
    return images


class ToyVAE:
    """A fixed random 4x4-patch projection to 4 latent channels: deterministic, invertible enough to look at."""

    def __init__(self, latent_channels: int = 4, patch: int = 4, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.patch = patch
        self.projection = torch.randn(latent_channels, 3 * patch * patch, generator=generator) / (3 * patch * patch) ** 0.5

    def encode(self, image: Tensor) -> Tensor:
        c, h, w = image.shape
        p = self.patch
        patches = image.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(h // p, w // p, c * p * p)
        return (patches @ self.projection.T * 2.0).permute(2, 0, 1).contiguous()


def toy_dataset(count: int = 4, seed: int = 0, size: int = 32) -> TrainingData:
    """`count` generated images as toy latents [4, size/4, size/4], each with its own caption."""
    vae = ToyVAE(seed=seed)
    latents = [vae.encode(image) for image in make_shape_images(count, size=size, seed=seed)]
    return TrainingData(latents=latents, conds=make_caption_embeddings(count, seed=seed + 1))


def write_toy_job(folder, config, images: int = 4, seed: int = 0, prediction_type: str = "eps",
                  net: ToyNetConfig | None = None, output: dict | None = None, overwrite: bool = False,
                  size: int = 32):
    """A training job folder (training/job.py) on a toy denoiser: what the headless runner's tests and
    bench train without ComfyUI."""
    from dataclasses import asdict

    from .training.job import write_job

    data = toy_dataset(images, seed=seed, size=size)
    model = {"kind": "toy", "prediction_type": prediction_type, "seed": seed, "net": asdict(net or ToyNetConfig())}
    return write_job(folder, model, config, data.latents, data.conds, output=output, overwrite=overwrite)
