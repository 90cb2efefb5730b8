"""Sample images during training: which steps, which seeds, and what sampling may not change.

The rendering is ComfyUI's (tests/integration/test_training_samples.py); here the schedule, the
loop's sample point (under no_grad, training bit-identical with or without it) and the memory rule
(a run that samples peaks at max(training, sampling), not their sum) run on the toy model on CPU.
"""

import pytest
import torch

from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import attach_bypass
from lora_core.adapters.targets import TargetSpec
from lora_core.errors import UserInputError
from lora_core.toy import make_caption_embeddings, make_toy_denoiser, toy_dataset
from lora_core.training.loop import ResumePoint, TrainCallbacks, TrainConfig, train
from lora_core.training.sampling import SampleSchedule, prompt_seed, sample_file_name


def config(**overrides) -> TrainConfig:
    settings = dict(steps=8, batch_size=2, learning_rate=1e-2, training_dtype="fp32", adapter=AdapterSpec(rank=4, alpha=4),
                    targets=TargetSpec(preset="all"), gradient_checkpointing=False)
    settings.update(overrides)
    return TrainConfig(**settings)


# ---- the schedule ----------------------------------------------------------------------------------------------

def test_rows_fall_on_multiples_of_the_interval_and_on_the_last_step():
    assert SampleSchedule(every_steps=50).steps(0, 200) == [50, 100, 150, 200]
    assert SampleSchedule(every_steps=60).steps(0, 200) == [60, 120, 180, 200]
    assert SampleSchedule(every_steps=50, at_start=True).steps(0, 200) == [0, 50, 100, 150, 200]
    assert SampleSchedule().steps(0, 10) == [10]


def test_every_checkpoint_has_a_row():
    schedule = SampleSchedule(every_steps=50, checkpoint_every=30)
    rows = schedule.steps(0, 120)
    assert rows == [30, 50, 60, 90, 100, 120]
    assert all(step in rows for step in range(30, 120, 30))


def test_a_resumed_run_continues_the_same_sequence():
    schedule = SampleSchedule(every_steps=3)
    whole = schedule.steps(0, 12)
    first, second = schedule.steps(0, 6), schedule.steps(6, 12)
    assert first + second == whole == [3, 6, 9, 12]
    # at_start on a resumed run redraws the row the first run ended with (same weights, same noise)
    assert SampleSchedule(every_steps=3, at_start=True).steps(6, 12) == [6, 9, 12]
    assert not schedule.due(13, 6, 12) and not schedule.due(5, 6, 12)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_schedule_rejects_bad_intervals(bad):
    with pytest.raises(UserInputError, match="every_steps"):
        SampleSchedule(every_steps=bad)


def test_prompt_seeds_are_the_kssampler_seeds_of_each_prompt():
    assert [prompt_seed(7, k) for k in range(3)] == [7, 8, 9]
    assert prompt_seed(2**64 - 1, 1) == 0
    assert sample_file_name(150, 2) == "step_150_2.png"


# ---- the loop's sample point -------------------------------------------------------------------------------------

def euler_samples(denoiser, conds, shape, seeds, steps=6) -> torch.Tensor:
    """A small Euler sampler over the denoiser (what the host's sampler does at the sample point)."""
    images = []
    for cond, seed in zip(conds, seeds):
        torch.manual_seed(seed)  # as ComfyUI's prepare_noise does: the global generator
        x = torch.randn(1, *shape)
        sigmas = denoiser.sigma_at(torch.linspace(1.0, 0.0, steps + 1))
        x = x * sigmas[0]
        for i in range(steps):
            denoised = denoiser.denoise(x, sigmas[i:i + 1], [cond])
            x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
        images.append(x)
    return torch.cat(images)


def test_sampling_happens_at_the_scheduled_steps_without_grad_and_changes_nothing():
    denoiser, data = make_toy_denoiser(), toy_dataset()
    prompts = make_caption_embeddings(2, seed=5)
    calls, rendered = [], {}

    def on_sample(step):
        calls.append((step, torch.is_grad_enabled()))
        rendered[step] = euler_samples(denoiser, prompts, (4, 8, 8), [prompt_seed(3, k) for k in range(2)])

    schedule = SampleSchedule(every_steps=3, at_start=True, checkpoint_every=4)
    plain = train(denoiser, data, config())
    sampled = train(denoiser, data, config(save_every_steps=4),
                    TrainCallbacks(on_sample=on_sample, sample_schedule=schedule))
    assert calls == [(0, False), (3, False), (4, False), (6, False), (8, False)]
    for key, tensor in plain.adapter_set.to_state_dict().items():
        assert torch.equal(tensor, sampled.adapter_set.to_state_dict()[key]), key
    assert plain.loss == sampled.loss
    # step 0 is the base model (fresh adapters are an identity); later rows see the trained adapters
    base = euler_samples(denoiser, prompts, (4, 8, 8), [3, 4])
    assert torch.equal(rendered[0], base)
    assert not torch.allclose(rendered[8], base)
    with attach_bypass(denoiser.module, sampled.adapter_set), torch.no_grad():
        assert torch.allclose(rendered[8], euler_samples(denoiser, prompts, (4, 8, 8), [3, 4]), rtol=1e-5, atol=1e-4)


def test_a_resumed_run_draws_the_same_samples_at_the_same_steps():
    denoiser, data = make_toy_denoiser(), toy_dataset()
    prompts = make_caption_embeddings(1, seed=5)
    schedule = SampleSchedule(every_steps=2)

    def run(steps, resume=None):
        rows = {}
        callbacks = TrainCallbacks(sample_schedule=schedule,
                                   on_sample=lambda step: rows.update({step: euler_samples(denoiser, prompts,
                                                                                           (4, 8, 8), [11])}))
        return train(denoiser, data, config(steps=steps), callbacks, resume), rows

    whole, whole_rows = run(8)
    first, first_rows = run(4)
    resume = ResumePoint(first.adapter_set, first.total_steps, first.optimizer_state)
    _, second_rows = run(4, resume)
    assert sorted(whole_rows) == sorted({**first_rows, **second_rows}) == [2, 4, 6, 8]
    for step, images in {**first_rows, **second_rows}.items():
        assert torch.equal(images, whole_rows[step]), step


# ---- memory: max(training, sampling), not the sum -----------------------------------------------------------------

def profiled_peak(run) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU while `run` runs, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def test_peak_memory_of_a_run_that_samples_is_the_larger_of_training_and_sampling():
    denoiser, data = make_toy_denoiser(), toy_dataset(count=8, size=64)   # latents [4, 16, 16]
    prompts = make_caption_embeddings(2, seed=5)
    sample_shape = (4, 96, 96)  # sampling at a larger size than training: its memory is of the same order
    cfg = config(steps=4, batch_size=8)
    schedule = SampleSchedule(every_steps=2)

    def sample():
        euler_samples(denoiser, prompts, sample_shape, [1, 2], steps=3)

    train_peak = profiled_peak(lambda: train(denoiser, data, cfg))
    result = train(denoiser, data, cfg)
    with attach_bypass(denoiser.module, result.adapter_set), torch.no_grad():
        sample_peak = profiled_peak(sample)
    # What stays allocated between steps while a sample is drawn: adapters and optimizer state.
    params = [p for p in result.adapter_set.parameters()]
    resident = sum(p.numel() * p.element_size() for p in params) * 3  # weights + AdamW's two moments
    with_sampling_peak = profiled_peak(lambda: train(denoiser, data, cfg,
                                                     TrainCallbacks(on_sample=lambda step: sample(),
                                                                    sample_schedule=schedule)))
    bound = max(train_peak, resident + sample_peak)
    assert sample_peak > 0.3 * train_peak, (sample_peak, train_peak)  # both matter, so a sum would show
    assert with_sampling_peak <= bound * 1.02, (with_sampling_peak, train_peak, sample_peak, resident)
    assert with_sampling_peak < train_peak + 0.5 * sample_peak, (with_sampling_peak, train_peak, sample_peak)
