"""The training loop: adapters on a frozen denoiser, trained on latents with their own captions.

Read `train` top to bottom: set up (randomness, adapters, optimizer, precision, checkpointing),
then one optimizer step per iteration (micro-batches, accumulate, clip, step, report), then the
result. Every random draw comes from a generator seeded by (seed, purpose, position) (see
`training/seeds.py`), so the same inputs and seed on CPU give bit-identical weights, a run resumed
at step N continues exactly as an uninterrupted one, and batch 4 sees per sample what 2 x 2
accumulation sees. Launched by torchrun, each process trains a replica on its share of every
micro-batch and the adapter gradients are summed over the ranks (`training/distributed.py`), so
the result does not depend on the number of processes.

Adapters, checkpointing and the frozen flags are undone by an ExitStack (try/finally): a cancel
that arrives as a `BaseException` from a callback (ComfyUI's progress bar does this) leaves the
model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapters.adapter_set import AdapterSet
from ..adapters import AdapterSpec
from ..adapters.attach import attach_bypass, attach_merged
from ..memory.autograd_safety import AutogradSafety
from ..memory.checkpointing import GradientCheckpointing
from ..memory.device_memory import activation_budget
from .denoiser import Denoiser
from ..errors import TrainingStopped, UserInputError
from .objectives import Objective, ObjectiveConfig
from ..memory.offload import BlockOffloader, check_offloading
from .optim import align_optimizer_state, make_optimizer, normalise_optimizer_name, parameter_groups
from ..memory.quantized import require_bypass_for_quantized
from .schedule import check_scheduler, lr_multiplier
from ..adapters.targets import TargetSpec
from .distributed import DataParallel
from .plan import BatchPlan, MicroBatch
from .precision import Precision, check_training_dtype
from .seeds import generator_for

# Noise levels of the validation loss, spread over the range where the loss says most.
VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _whole(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{name} must be a whole number >= {minimum}, got {value!r}.")


def _number(name: str, value, minimum: float, strictly: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strictly and value == minimum):
        bound = f"> {minimum}" if strictly else f">= {minimum}"
        raise UserInputError(f"{name} must be a finite number {bound}, got {value!r}.")


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps in this run
    batch_size: int = 1
    grad_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    loraplus_ratio: float = 1.0
    max_grad_norm: float = 0.0  # 0 = no clipping
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    targets: TargetSpec = field(default_factory=TargetSpec)
    seed: int = 0
    training_dtype: str = "bf16"  # autocast dtype: bf16 / fp16 / fp32 / none
    bypass: bool = False  # True: forward hooks (base weights untouched); False: W + dW each forward
    gradient_checkpointing: bool = True
    checkpoint_depth: int = 1
    checkpoint_policy: str = "auto"  # "auto": recompute only what memory needs; "all_blocks": every block
    offloading: bool = False  # frozen block weights stream from the CPU, one block at a time
    save_every_steps: int = 0  # 0 = only the final result
    validation_every_steps: int = 0  # 0 = no validation loss
    validation_samples: int = 4
    max_bad_steps: int = 5  # consecutive non-finite losses before giving up

    def __post_init__(self):
        for name, minimum in (("steps", 1), ("batch_size", 1), ("grad_accumulation_steps", 1), ("checkpoint_depth", 1),
                              ("warmup_steps", 0), ("save_every_steps", 0), ("validation_every_steps", 0),
                              ("validation_samples", 1), ("max_bad_steps", 1), ("seed", 0)):
            _whole(name, getattr(self, name), minimum)
        _number("learning_rate", self.learning_rate, 0.0, strictly=True)
        _number("weight_decay", self.weight_decay, 0.0)
        _number("loraplus_ratio", self.loraplus_ratio, 0.0, strictly=True)
        _number("max_grad_norm", self.max_grad_norm, 0.0)
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            raise UserInputError(f"checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}, "
                                 f"got {self.checkpoint_policy!r}.")
        self.optimizer = normalise_optimizer_name(self.optimizer)
        self.lr_scheduler = check_scheduler(self.lr_scheduler)
        self.training_dtype = check_training_dtype(self.training_dtype)
        check_offloading(self.offloading, self.gradient_checkpointing)
        for name, kind in (("objective", ObjectiveConfig), ("adapter", AdapterSpec), ("targets", TargetSpec)):
            if not isinstance(getattr(self, name), kind):
                raise UserInputError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}.")


CHECKPOINT_POLICIES = ("auto", "all_blocks")


@dataclass
class TrainingData:
    """Latents ([C,H,W] or [C,T,H,W], on CPU), one conditioning per sample or one for all, repeats."""

    latents: list[Tensor]
    conds: list
    weights: list[float] | None = None

    def __post_init__(self):
        if not self.latents:
            raise UserInputError("The dataset has no latents: connect the latents of at least one image.")
        bad = [i for i, x in enumerate(self.latents) if not isinstance(x, Tensor) or x.ndim not in (3, 4)]
        if bad:
            raise UserInputError(
                f"Latent {bad[0]} is not a [C,H,W] or [C,T,H,W] tensor: pass one latent per sample, without a batch axis."
            )
        if len(self.conds) not in (1, len(self.latents)):
            raise UserInputError(
                f"{len(self.conds)} conditionings for {len(self.latents)} latents: give one per latent, or one for all."
            )
        if self.weights is not None:
            if len(self.weights) != len(self.latents):
                raise UserInputError(f"{len(self.weights)} sample weights for {len(self.latents)} latents: give one per latent.")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise UserInputError("Sample weights (repeats) must be >= 0 with at least one above 0.")

    def __len__(self) -> int:
        return len(self.latents)

    def cond(self, index: int):
        return self.conds[index if len(self.conds) > 1 else 0]

    def sample_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.latents)


@dataclass
class TrainCallbacks:
    on_step: Callable[[int, float, float], None] | None = None  # (global step, loss, lr)
    should_stop: Callable[[], bool] | None = None  # polled before every step: True ends cleanly
    # (global step, adapters, optimizer state on CPU) every `save_every_steps` before the last step. The
    # adapters are the live ones: save them (`to_state_dict` copies) inside the callback.
    on_checkpoint: Callable[[int, AdapterSet, dict], None] | None = None
    on_validation: Callable[[int, float], None] | None = None  # (global step, validation loss)


@dataclass
class ResumePoint:
    """Where a run continues from: loaded adapters, steps already done, optimizer state if saved."""

    adapter_set: AdapterSet
    steps_done: int
    optimizer_state: dict | None = None
    source: str = "the resumed LoRA"  # named in error messages


@dataclass
class TrainResult:
    adapter_set: AdapterSet
    loss: list[float]  # one per optimizer step of this run (NaN for a skipped step)
    steps: list[int]  # the global step number of each loss entry
    lr: list[float]
    val_loss: list[tuple[int, float]]  # (global step, validation loss)
    total_steps: int  # including steps done before a resume
    optimizer_state: dict
    stopped_early: bool = False

    def loss_map(self) -> dict[str, list]:
        """LOSS_MAP for the nodes: "loss" plus "steps", "lr", "val_loss" and "val_steps"."""
        return {
            "loss": list(self.loss),
            "steps": list(self.steps),
            "lr": list(self.lr),
            "val_loss": [v for _, v in self.val_loss],
            "val_steps": [s for s, _ in self.val_loss],
        }


class NonFiniteLoss(TrainingStopped):
    """Too many non-finite losses in a row; `result` holds the last good weights."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


def cpu_copy(state: dict) -> dict:
    """Optimizer state detached from the live tensors, on CPU, for saving while training goes on."""
    return copy.deepcopy(_map_tensors(state, lambda t: t.detach().to("cpu")))


def _map_tensors(value, function):
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, function) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, function) for v in value)
    return value


def _draws(objective: Objective, batch: MicroBatch, x0: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(t, noise) for each sample from its own visit's generator."""
    draws = [objective.draw(x0[i : i + 1], generator_for(seed, "noise", *visit)) for i, visit in enumerate(batch.visits)]
    return torch.cat([t for t, _ in draws]), torch.cat([n for _, n in draws])


def _latent_batch(denoiser: Denoiser, data: TrainingData, indices, device: torch.device) -> Tensor:
    latents = torch.stack([data.latents[i] for i in indices]).to(device, non_blocking=True)
    return denoiser.prepare_latents(latents.float())


@torch.no_grad()
def validation_loss(
    denoiser: Denoiser, objective: Objective, data: TrainingData, count: int, seed: int, precision: Precision,
    device: torch.device,
) -> float:
    """Mean loss on the first `count` samples at fixed noise levels with fixed noise: comparable across steps."""
    t = torch.tensor(VALIDATION_TIMESTEPS)
    losses = []
    for index in range(min(count, len(data))):
        x0 = _latent_batch(denoiser, data, [index] * len(t), device)
        noise = torch.randn(x0.shape, generator=generator_for(seed, "validation", index)).to(device)
        with precision.autocast():
            losses.append(objective.loss_at(denoiser, x0, [data.cond(index)] * len(t), t.to(device), noise).mean())
    return torch.stack(losses).mean().item()


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Base weights never collect gradients while training; their flags come back afterwards."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def train(
    denoiser: Denoiser,
    data: TrainingData,
    config: TrainConfig,
    callbacks: TrainCallbacks | None = None,
    resume: ResumePoint | None = None,
    validation_data: TrainingData | None = None,
    replica: DataParallel | None = None,
) -> TrainResult:
    """Train adapters on `denoiser`. With `replica` (one process of a torchrun group) every rank
    runs this with the same arguments; `config.batch_size` stays the step's total over all ranks,
    validation runs on rank 0 only, and callbacks should write files on rank 0 only."""
    callbacks = callbacks or TrainCallbacks()
    device = torch.device(denoiser.device)
    objective = Objective(config.objective)
    precision = Precision(config.training_dtype, device)
    validation_data = data if validation_data is None else validation_data

    # Adapters: fresh ones seeded by `seed` (created on CPU so the init does not depend on the
    # device), or the ones being resumed. Parameters stay float32 whatever the training dtype.
    if resume is None:
        adapter_set = AdapterSet.create(
            denoiser.module, config.adapter, config.targets, generator_for(config.seed, "init"), dtype=torch.float32
        )
        steps_done = 0
    else:
        adapter_set, steps_done = resume.adapter_set, resume.steps_done
    adapter_set = adapter_set.to(device=device, dtype=torch.float32)
    if replica is not None:
        replica.broadcast_parameters(adapter_set.parameters())
    validate = config.validation_every_steps and (replica is None or replica.is_main)

    optimizer = make_optimizer(
        config.optimizer,
        parameter_groups(adapter_set.named_parameters(), config.learning_rate, config.loraplus_ratio),
        config.weight_decay,
    )
    if resume is not None and resume.optimizer_state is not None:
        optimizer.load_state_dict(align_optimizer_state(resume.optimizer_state, optimizer, resume.source))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    plan = BatchPlan([x.shape for x in data.latents], data.sample_weights(), config.batch_size, config.seed)
    batches = plan.micro_batches(start=steps_done * config.grad_accumulation_steps)
    total_steps = steps_done + config.steps

    loss_history: list[float] = []
    step_history: list[int] = []
    lr_history: list[float] = []
    val_history: list[tuple[int, float]] = []
    bad_steps, stopped_early = 0, False

    def result(final_step: int) -> TrainResult:
        return TrainResult(adapter_set, loss_history, step_history, lr_history, val_history, final_step,
                           cpu_copy(optimizer.state_dict()), stopped_early)

    # Quantized (float8 / packed) weights cannot hold W + dW: only bypass hooks train on them.
    require_bypass_for_quantized(denoiser.module, config.bypass)
    attach = attach_bypass if config.bypass else lambda m, s: attach_merged(m, s, trainable=True)
    reference_ops = getattr(denoiser, "autograd_reference_ops", None)  # optional part of the protocol
    step = steps_done
    with contextlib.ExitStack() as attached:
        attached.enter_context(_frozen(denoiser.module))
        attached.enter_context(attach(denoiser.module, adapter_set))
        if config.gradient_checkpointing:
            # Offloading streams each block's weights for its recompute: every block is recomputed.
            budget = None
            if config.checkpoint_policy == "auto" and not config.offloading:
                budget = lambda: activation_budget(denoiser.module, device)  # noqa: E731
            attached.enter_context(GradientCheckpointing(denoiser.module, config.checkpoint_depth, keep_budget=budget))
        offloader = None
        if config.offloading:  # after attach: a merge parametrization's weight is streamed too
            offloader = attached.enter_context(BlockOffloader(denoiser.module, device, depth=config.checkpoint_depth))

        def record_validation() -> None:
            val_history.append((step, validation_loss(denoiser, objective, validation_data, config.validation_samples,
                                                      config.seed, precision, device)))
            if callbacks.on_validation is not None:
                callbacks.on_validation(*val_history[-1])

        if validate:
            record_validation()

        while step < total_steps:
            stop = callbacks.should_stop is not None and callbacks.should_stop()
            if replica is not None:
                stop = replica.any(stop)  # a stop on any rank stops all of them at the same step
            if stop:
                stopped_early = True
                break

            # Learning rate: a pure function of the global step, so resuming needs no scheduler state.
            multiplier = lr_multiplier(config.lr_scheduler, step, total_steps, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * multiplier

            # Forward and backward over the micro-batches of this step. Each micro-batch's loss is
            # its share of the step's mean, so accumulation sums to the same gradient as one batch.
            micro_batches = [next(batches) for _ in range(config.grad_accumulation_steps)]
            sample_count = sum(len(b.indices) for b in micro_batches)
            summed_loss = torch.zeros((), device=device)
            for batch in micro_batches:
                if replica is not None:
                    batch = replica.share(batch)
                    if not batch.indices:
                        continue  # fewer samples than ranks: this rank adds a zero gradient
                x0 = _latent_batch(denoiser, data, batch.indices, device)
                t, noise = _draws(objective, batch, x0, config.seed)
                conds = [data.cond(i) for i in batch.indices]
                # Model code written for inference writes into tensors autograd saved (and calls
                # fused ops without gradients): made safe for this forward + backward only.
                with AutogradSafety(reference_ops):
                    with precision.autocast():
                        per_sample = objective.loss_at(denoiser, x0, conds, t.to(device), noise.to(device))
                    loss = per_sample.sum() / sample_count
                    precision.backward(loss)
                summed_loss += loss.detach()
            if replica is not None:
                summed_loss = replica.sum(summed_loss)
                replica.reduce_gradients(trainable)
            step_loss = summed_loss.item()
            if offloader is not None:
                offloader.release_all()  # the block recomputed last is not needed until the next forward

            # Update, unless the loss or the gradient is not finite: then the step is skipped and
            # the weights stay the last good ones.
            precision.unscale(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            )
            finite = math.isfinite(step_loss) and (precision.scaler is not None or torch.isfinite(grad_norm).item())
            if finite:
                precision.step(optimizer)
                bad_steps = 0
            else:
                bad_steps += 1
                if precision.scaler is not None:
                    precision.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # Report.
            lr = optimizer.param_groups[0]["lr"]
            loss_history.append(step_loss if finite else float("nan"))
            step_history.append(step)
            lr_history.append(lr)
            if bad_steps >= config.max_bad_steps:
                raise NonFiniteLoss(
                    f"Training stopped at step {step}: the loss was not finite for {bad_steps} steps in a row. "
                    "The last good weights are kept. Lower the learning rate, use training_dtype bf16 or fp32 "
                    "instead of fp16, or set max_grad_norm (e.g. 1.0).",
                    result(step - bad_steps),
                )
            if callbacks.on_step is not None:
                callbacks.on_step(step, loss_history[-1], lr)
            if validate and (step % config.validation_every_steps == 0 or step == total_steps):
                record_validation()
            if callbacks.on_checkpoint is not None and config.save_every_steps and step % config.save_every_steps == 0 \
                    and step < total_steps:
                callbacks.on_checkpoint(step, adapter_set, cpu_copy(optimizer.state_dict()))

    return result(step)
