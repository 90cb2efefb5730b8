import math

import pytest
import torch

from lora_core.errors import UserInputError
from lora_core.training.objectives import Objective, ObjectiveConfig, sample_timesteps
from lora_core.toy import make_caption_embeddings, make_toy_denoiser


class Oracle:
    """Wraps a toy denoiser but predicts the true x0: every objective's loss must be 0."""

    def __init__(self, inner, x0):
        self.inner, self.x0 = inner, x0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def denoise(self, x_t, sigma, conds):
        return self.x0.clone()


def _batch(count=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 4, 8, 8, generator=generator), make_caption_embeddings(count)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "flow"])
@pytest.mark.parametrize("target", ["native", "x0"])
def test_a_perfect_denoiser_has_zero_loss(prediction_type, target):
    x0, conds = _batch()
    oracle = Oracle(make_toy_denoiser(prediction_type), x0)
    loss = Objective(ObjectiveConfig(target=target)).loss(oracle, x0, conds, torch.Generator().manual_seed(0))
    assert loss.shape == (3,)
    assert torch.allclose(loss, torch.zeros(3), atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "flow"])
def test_native_target_is_the_models_own_target(prediction_type):
    denoiser = make_toy_denoiser(prediction_type)
    x0, _ = _batch()
    noise = torch.randn_like(x0)
    t = torch.tensor([0.2, 0.5, 0.9])
    sigma = denoiser.sigma_at(t)
    s = sigma.view(-1, 1, 1, 1)
    x_t = denoiser.add_noise(x0, noise, sigma)
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in denoiser.output_coefficients(sigma))
    native = (x0 - c_skip * x_t) / c_out
    expected = {
        "eps": noise,
        "v": (noise - s * x0) / (s**2 + 1).sqrt(),
        "flow": noise - x0,
    }[prediction_type]
    assert torch.allclose(native, expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "flow"])
def test_native_prediction_is_the_raw_network_output(prediction_type):
    denoiser = make_toy_denoiser(prediction_type)
    x0, conds = _batch()
    sigma = denoiser.sigma_at(torch.tensor([0.3, 0.6, 0.95]))
    x_t = denoiser.add_noise(x0, torch.randn_like(x0), sigma)
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in denoiser.output_coefficients(sigma))
    native = (denoiser.denoise(x_t, sigma, conds) - c_skip * x_t) / c_out
    scale = 1.0 if prediction_type == "flow" else 1 / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
    feature = sigma if prediction_type == "flow" else sigma.log() / 4
    raw = denoiser.module(x_t * scale, feature, torch.stack(conds))
    assert torch.allclose(native, raw, atol=1e-4)


@pytest.mark.parametrize(
    "prediction_type, target, expected",
    [
        ("eps", "native", lambda snr, s: torch.clamp(snr, max=5) / snr),
        ("v", "native", lambda snr, s: torch.clamp(snr, max=5) / (snr + 1)),
        ("flow", "native", lambda snr, s: torch.clamp(snr, max=5) * s**2),
        ("eps", "x0", lambda snr, s: torch.clamp(snr, max=5)),
        ("flow", "x0", lambda snr, s: torch.clamp(snr, max=5)),
    ],
)
def test_min_snr_weights_follow_the_paper(prediction_type, target, expected):
    denoiser = make_toy_denoiser(prediction_type)
    sigma = denoiser.sigma_at(torch.tensor([0.05, 0.3, 0.6, 0.99]))
    snr = ((1 - sigma) / sigma) ** 2 if prediction_type == "flow" else 1 / sigma**2
    objective = Objective(ObjectiveConfig(target=target, loss_weighting="min_snr", min_snr_gamma=5))
    weights = objective.weights(denoiser, sigma, torch.zeros(4, 4, 8, 8))
    assert torch.allclose(weights, expected(snr, sigma), rtol=1e-5)
    assert (weights <= 5 + 1e-6).all()


def test_timestep_samplings():
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    uniform = sample_timesteps(ObjectiveConfig(), 4000, generator())
    unshifted = sample_timesteps(ObjectiveConfig(timestep_sampling="shifted", shift=1.0), 4000, generator())
    shifted = sample_timesteps(ObjectiveConfig(timestep_sampling="shifted", shift=3.0), 4000, generator())
    logit = sample_timesteps(ObjectiveConfig(timestep_sampling="logit_normal", logit_normal_mean=1.0), 4000, generator())
    assert torch.equal(uniform, unshifted)
    assert torch.allclose(shifted, 3 * uniform / (1 + 2 * uniform), atol=3e-3)  # both clamped at t = 1e-3
    assert shifted.mean() > uniform.mean() + 0.1
    assert abs(logit.median().item() - 1 / (1 + math.exp(-1.0))) < 0.03
    for t in (uniform, shifted, logit):
        assert t.min() > 0 and t.max() <= 1


@pytest.mark.parametrize("loss_function", ["mse", "l1", "huber", "smooth_l1"])
def test_loss_functions_on_known_errors(loss_function):
    config = ObjectiveConfig(loss_function=loss_function, huber_delta=1.0)
    from lora_core.training.objectives import elementwise_loss

    error = torch.tensor([0.5, 3.0])
    got = elementwise_loss(config, error, torch.zeros(2))
    expected = {
        "mse": [0.25, 9.0],
        "l1": [0.5, 3.0],
        "huber": [0.125, 2.5],
        "smooth_l1": [0.125, 2.5],
    }[loss_function]
    assert torch.allclose(got, torch.tensor(expected))


def test_randomness_comes_only_from_the_generator():
    denoiser = make_toy_denoiser("eps")
    x0, conds = _batch()
    objective = Objective(ObjectiveConfig(noise_offset=0.1))
    first = objective.loss(denoiser, x0, conds, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must not matter
    second = objective.loss(denoiser, x0, conds, torch.Generator().manual_seed(5))
    other = objective.loss(denoiser, x0, conds, torch.Generator().manual_seed(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_noise_offset_adds_a_constant_per_channel():
    x0 = torch.zeros(2, 3, 4, 4)
    _, plain = Objective(ObjectiveConfig()).draw(x0, torch.Generator().manual_seed(0))
    _, offset = Objective(ObjectiveConfig(noise_offset=0.5)).draw(x0, torch.Generator().manual_seed(0))
    difference = offset - plain
    assert difference.abs().max() > 0
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"target": "eps"}, "target"),
        ({"timestep_sampling": "cosine"}, "timestep_sampling"),
        ({"loss_function": "ssim"}, "loss_function"),
        ({"min_snr_gamma": 0}, "min_snr_gamma"),
        ({"shift": -1.0}, "shift"),
        ({"noise_offset": float("nan")}, "noise_offset"),
    ],
)
def test_bad_settings_name_the_parameter(settings, word):
    with pytest.raises(UserInputError, match=word):
        ObjectiveConfig(**settings)


class SigmaRecorder:
    """Wraps a toy denoiser and records the sigmas the objective trains at."""

    def __init__(self, inner):
        self.inner, self.sigmas = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def denoise(self, x_t, sigma, conds):
        self.sigmas.append(sigma.detach().clone())
        return self.inner.denoise(x_t, sigma, conds)


@pytest.mark.parametrize("prediction_type", ["eps", "flow"])
@pytest.mark.parametrize("low, high", [(0.875, 1.0), (0.0, 0.875), (0.2, 0.4)])
def test_noise_level_range_keeps_sigmas_inside_it(prediction_type, low, high):
    """Wan 2.2 14B expert training (musubi-tuner's timestep boundary): every sigma drawn lies in the
    range, as a fraction of the model's largest sigma, and the whole range is used."""
    recorder = SigmaRecorder(make_toy_denoiser(prediction_type))
    top = recorder.sigma_at(torch.ones(1)).item()
    objective = Objective(ObjectiveConfig(min_noise_level=low, max_noise_level=high))
    x0, conds = _batch(64)
    for seed in range(4):
        objective.loss(recorder, x0, conds, torch.Generator().manual_seed(seed))
    levels = torch.cat(recorder.sigmas) / top
    assert levels.min() >= low - 1e-4 and levels.max() <= high + 1e-4
    assert levels.min() < low + 0.1 * (high - low) and levels.max() > high - 0.1 * (high - low)


def test_noise_level_range_must_be_a_range():
    with pytest.raises(UserInputError, match="min_noise_level < max_noise_level"):
        ObjectiveConfig(min_noise_level=0.9, max_noise_level=0.5)
