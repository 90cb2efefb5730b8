import math

import pytest
import torch
from lora_core.toy import toy_dataset

from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import attach_merged
from lora_core.errors import TrainingStopped, UserInputError
from lora_core.training.objectives import Objective, ObjectiveConfig
from lora_core.adapters.targets import TargetSpec
from lora_core.toy import make_toy_denoiser
from lora_core.training.loop import NonFiniteLoss, TrainCallbacks, TrainConfig, TrainingData, train
from lora_core.training.plan import BatchPlan


def fast_config(**overrides) -> TrainConfig:
    settings = dict(
        steps=30,
        batch_size=4,
        learning_rate=2e-2,
        training_dtype="fp32",
        adapter=AdapterSpec(rank=8, alpha=8),
        targets=TargetSpec(preset="all"),
        gradient_checkpointing=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def state(result) -> dict[str, torch.Tensor]:
    return result.adapter_set.to_state_dict()


def fixed_error(denoiser, data, t=(0.2, 0.5, 0.8)) -> torch.Tensor:
    """Per-sample x0-space error at fixed noise levels and noise, for before/after comparisons."""
    objective = Objective(ObjectiveConfig(target="x0"))
    errors = []
    with torch.no_grad():
        for index in range(len(data)):
            x0 = torch.stack([data.latents[index]] * len(t))
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + index))
            conds = [data.cond(index)] * len(t)
            errors.append(objective.loss_at(denoiser, x0, conds, torch.tensor(t), noise).mean())
    return torch.stack(errors)


def outputs(denoiser, data) -> torch.Tensor:
    x = torch.stack(data.latents)
    with torch.no_grad():
        return denoiser.denoise(x, torch.full((len(data),), 0.5), list(data.conds))


@pytest.mark.parametrize("prediction_type", ["eps", "v", "flow"])
def test_loss_halves_and_the_lora_beats_the_base_model(prediction_type):
    denoiser, data = make_toy_denoiser(prediction_type), toy_dataset()
    base_outputs = outputs(denoiser, data)
    base_error = fixed_error(denoiser, data)
    result = train(denoiser, data, fast_config(steps=150, validation_every_steps=150))

    (_, first), (_, last) = result.val_loss[0], result.val_loss[-1]
    assert last < 0.5 * first
    assert sum(result.loss[-15:]) < 0.5 * sum(result.loss[:15])
    assert torch.equal(outputs(denoiser, data), base_outputs), "training must leave the model as it was"
    with attach_merged(denoiser.module, result.adapter_set):
        trained_error = fixed_error(denoiser, data)
    assert (trained_error < base_error).all()
    assert trained_error.mean() < 0.5 * base_error.mean()


class CaptionMixingDenoiser:
    """What a trainer that gives a whole batch the first sample's caption effectively trains."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def denoise(self, x_t, sigma, conds):
        return self.inner.denoise(x_t, sigma, [conds[0]] * len(conds))


def test_each_sample_learns_its_own_caption():
    data = toy_dataset(4)
    # Timesteps mostly near pure noise, where the caption is all the model has to go on.
    objective = ObjectiveConfig(timestep_sampling="logit_normal", logit_normal_mean=3.0)
    config = fast_config(steps=200, batch_size=4, learning_rate=3e-2, objective=objective)

    own = make_toy_denoiser("v")
    result = train(own, data, config)
    mixed = make_toy_denoiser("v")
    mixed_result = train(CaptionMixingDenoiser(mixed), data, config)

    with attach_merged(own.module, result.adapter_set):
        own_error = fixed_error(own, data, t=(1.0, 1.0))
        own_predictions = predict_x0(own, data, t=1.0)
    with attach_merged(mixed.module, mixed_result.adapter_set):
        mixed_error = fixed_error(mixed, data, t=(1.0, 1.0))
        mixed_predictions = predict_x0(mixed, data, t=1.0)
    assert own_error.mean() < 0.4 * mixed_error.mean()

    # From pure noise, each prediction is nearest to its own sample's latent; with mixed
    # captions the model learns one compromise and cannot tell the samples apart.
    targets = torch.stack(data.latents).flatten(1)
    nearest = torch.cdist(own_predictions.flatten(1), targets).argmin(dim=1)
    mixed_nearest = torch.cdist(mixed_predictions.flatten(1), targets).argmin(dim=1)
    assert torch.equal(nearest, torch.arange(len(data)))
    assert not torch.equal(mixed_nearest, torch.arange(len(data)))


def predict_x0(denoiser, data, t: float) -> torch.Tensor:
    x0 = torch.stack(data.latents)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    sigma = denoiser.sigma_at(torch.full((len(data),), t))
    with torch.no_grad():
        return denoiser.denoise(denoiser.add_noise(x0, noise, sigma), sigma, list(data.conds))


def test_accumulating_two_batches_of_two_matches_one_batch_of_four():
    data = toy_dataset(8)
    one = train(make_toy_denoiser("v"), data, fast_config(steps=6, batch_size=4, optimizer="sgd", learning_rate=0.1))
    accumulated = train(
        make_toy_denoiser("v"), data,
        fast_config(steps=6, batch_size=2, grad_accumulation_steps=2, optimizer="sgd", learning_rate=0.1),
    )
    for key, tensor in state(one).items():
        assert torch.allclose(tensor, state(accumulated)[key], rtol=1e-4, atol=1e-6), key
    assert result_losses_close(one.loss, accumulated.loss)


def result_losses_close(a, b) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("bypass", [False, True])
def test_same_seed_gives_bit_identical_weights(bypass):
    data = toy_dataset(4)
    config = fast_config(steps=8, batch_size=2, bypass=bypass, gradient_checkpointing=True)
    first = train(make_toy_denoiser("eps"), data, config)
    torch.manual_seed(999)  # the global RNG must not matter
    second = train(make_toy_denoiser("eps"), data, config)
    other_seed = train(make_toy_denoiser("eps"), data, fast_config(steps=8, batch_size=2, seed=1, bypass=bypass))
    assert state(first).keys() == state(second).keys()
    assert all(torch.equal(t, state(second)[k]) for k, t in state(first).items())
    assert first.loss == second.loss
    assert any(not torch.equal(t, state(other_seed)[k]) for k, t in state(first).items())


def test_cancel_stops_cleanly_and_restores_the_model():
    denoiser, data = make_toy_denoiser("eps"), toy_dataset()
    base_outputs = outputs(denoiser, data)
    steps_seen = []
    callbacks = TrainCallbacks(on_step=lambda step, loss, lr: steps_seen.append(step), should_stop=lambda: len(steps_seen) >= 3)
    result = train(denoiser, data, fast_config(steps=20, gradient_checkpointing=True), callbacks)
    assert result.stopped_early and result.total_steps == 3 and len(result.loss) == 3
    assert torch.equal(outputs(denoiser, data), base_outputs)


class Interrupted(BaseException):
    """Like ComfyUI's InterruptProcessingException: not an Exception."""


@pytest.mark.parametrize("bypass", [False, True])
def test_a_base_exception_from_a_callback_leaves_no_trace(bypass):
    denoiser, data = make_toy_denoiser("eps"), toy_dataset()
    before = {name: p.detach().clone() for name, p in denoiser.module.named_parameters()}
    base_outputs = outputs(denoiser, data)

    def on_step(step, loss, lr):
        if step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        train(denoiser, data, fast_config(steps=20, bypass=bypass, gradient_checkpointing=True), TrainCallbacks(on_step=on_step))
    assert torch.equal(outputs(denoiser, data), base_outputs)
    after = dict(denoiser.module.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], t) for n, t in before.items())
    for module in denoiser.module.modules():
        assert not module._forward_hooks and "forward" not in module.__dict__


class FlakyDenoiser:
    """Returns NaN on chosen calls, as an fp16 overflow would."""

    def __init__(self, inner, bad_calls):
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def denoise(self, x_t, sigma, conds):
        self.calls += 1
        out = self.inner.denoise(x_t, sigma, conds)
        return out * float("nan") if self.calls in self.bad_calls else out


def test_a_non_finite_loss_skips_the_step():
    data = toy_dataset()
    snapshots = []
    callbacks = TrainCallbacks(on_checkpoint=lambda step, adapters, optimizer: snapshots.append(adapters.to_state_dict()))
    flaky = FlakyDenoiser(make_toy_denoiser("eps"), bad_calls={3})
    result = train(flaky, data, fast_config(steps=4, save_every_steps=1), callbacks)
    assert math.isnan(result.loss[2]) and all(math.isfinite(v) for i, v in enumerate(result.loss) if i != 2)
    after_step_2, after_step_3 = snapshots[1], snapshots[2]
    assert all(torch.equal(t, after_step_3[k]) for k, t in after_step_2.items()), "a skipped step changes nothing"
    assert any(not torch.equal(t, snapshots[0][k]) for k, t in after_step_2.items())


def test_too_many_non_finite_losses_in_a_row_stop_training():
    flaky = FlakyDenoiser(make_toy_denoiser("eps"), bad_calls={3, 4, 5})
    with pytest.raises(TrainingStopped, match="not finite for 3 steps") as caught:
        train(flaky, toy_dataset(), fast_config(steps=10, max_bad_steps=3))
    assert isinstance(caught.value, NonFiniteLoss)
    assert caught.value.result.total_steps == 2
    assert all(torch.isfinite(t).all() for t in caught.value.result.adapter_set.to_state_dict().values())


@pytest.mark.parametrize("training_dtype", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu_with_float32_adapters(training_dtype):
    result = train(make_toy_denoiser("flow"), toy_dataset(), fast_config(steps=3, training_dtype=training_dtype, bypass=True))
    assert all(math.isfinite(v) for v in result.loss)
    assert {p.dtype for p in result.adapter_set.parameters()} == {torch.float32}
    ups = [t for k, t in state(result).items() if k.endswith("lora_up.weight")]
    assert any(t.abs().sum() > 0 for t in ups), "the optimizer stepped (fp16: through the GradScaler)"


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "oft"])
def test_other_algorithms_train(algorithm):
    spec = AdapterSpec(algorithm=algorithm, rank=4, alpha=4 if algorithm != "oft" else 0, oft_block_size=4)
    result = train(make_toy_denoiser("v"), toy_dataset(), fast_config(steps=40, adapter=spec, learning_rate=1e-2))
    assert sum(result.loss[-5:]) < sum(result.loss[:5])
    assert result.adapter_set.algorithms() == {algorithm}


def test_schedule_warmup_loraplus_and_checkpoints():
    checkpoints = []
    callbacks = TrainCallbacks(on_checkpoint=lambda step, adapters, optimizer: checkpoints.append((step, optimizer)))
    config = fast_config(steps=10, lr_scheduler="cosine", warmup_steps=2, learning_rate=1e-2, loraplus_ratio=4.0, save_every_steps=4)
    result = train(make_toy_denoiser("eps"), toy_dataset(), config, callbacks)
    assert result.lr[:2] == pytest.approx([1e-2 / 3, 2e-2 / 3])
    assert result.lr[2] == pytest.approx(1e-2) and result.lr[-1] < result.lr[5] < result.lr[2]
    assert [step for step, _ in checkpoints] == [4, 8]
    groups = result.optimizer_state["param_groups"]
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(4 * groups[0]["initial_lr"])
    assert all(name.endswith(".up") for name in groups[1]["param_names"])
    assert all(t.device.type == "cpu" for s in checkpoints[0][1]["state"].values() for t in s.values())


def test_buckets_weights_and_validation_data():
    latents = toy_dataset(6).latents
    small = [x[:, :4, :4].clone() for x in latents[:3]]
    data = TrainingData(latents=small + latents[3:], conds=toy_dataset(1).conds, weights=[1, 2, 0, 1, 1, 1.0])
    plan = BatchPlan([x.shape for x in data.latents], data.sample_weights(), batch_size=2, seed=0)
    epoch = plan.epoch(0)
    visits = sorted(i for batch in epoch for i in batch.indices)
    assert visits == [0, 1, 1, 3, 4, 5]
    assert all(len({tuple(data.latents[i].shape) for i in batch.indices}) == 1 for batch in epoch)
    held_out = toy_dataset(2)
    result = train(make_toy_denoiser("eps"), data, fast_config(steps=5, batch_size=2, validation_every_steps=2), validation_data=held_out)
    assert [step for step, _ in result.val_loss] == [0, 2, 4, 5]
    assert result.loss_map()["val_steps"] == [0, 2, 4, 5]


def test_optional_optimizers_name_their_package():
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(UserInputError, match="pip install prodigyopt"):
            train(make_toy_denoiser("eps"), toy_dataset(), fast_config(steps=1, optimizer="Prodigy"))
    else:
        result = train(make_toy_denoiser("eps"), toy_dataset(), fast_config(steps=1, optimizer="Prodigy"))
        assert len(result.loss) == 1


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"optimizer": "adamax"}, "optimizer"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"training_dtype": "int8"}, "training_dtype"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
    ],
)
def test_bad_settings_name_the_parameter(settings, word):
    with pytest.raises(UserInputError, match=word):
        TrainConfig(**settings)


def test_bad_data_is_explained():
    latents = toy_dataset(3).latents
    with pytest.raises(UserInputError, match="2 conditionings for 3 latents"):
        TrainingData(latents=latents, conds=toy_dataset(2).conds)
    with pytest.raises(UserInputError, match="weights"):
        TrainingData(latents=latents, conds=toy_dataset(1).conds, weights=[0, 0, 0])


def test_lr_schedules():
    from lora_core.training.schedule import lr_multiplier

    assert [lr_multiplier("constant", s, 10, 2) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    linear = [lr_multiplier("linear", s, 10) for s in range(10)]
    cosine = [lr_multiplier("cosine", s, 10) for s in range(10)]
    assert linear[0] == cosine[0] == 1.0
    assert all(a > b for a, b in zip(linear, linear[1:])) and all(a > b for a, b in zip(cosine, cosine[1:]))
    assert linear[5] == pytest.approx(0.5) and cosine[5] == pytest.approx(0.5)
    assert 0 < linear[-1] < 0.2 and 0 < cosine[-1] < 0.05
