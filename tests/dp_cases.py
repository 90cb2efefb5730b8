"""The runs the data-parallel tests compare: each returns (denoiser, data, config) for the global batch.

Shared by tests/test_distributed.py (one process) and tests/dp_worker.py (each rank of two).
"""
import dataclasses

from lora_core.adapters import AdapterSpec
from lora_core.adapters.targets import TargetSpec
from lora_core.toy import ToyNetConfig, make_toy_denoiser, toy_dataset
from lora_core.training.loop import TrainConfig, TrainingData

NET = ToyNetConfig(width=16)


def config(**changes) -> TrainConfig:
    base = TrainConfig(steps=6, batch_size=4, learning_rate=1e-2, optimizer="adamw", weight_decay=0.01,
                       max_grad_norm=1.0, adapter=AdapterSpec(rank=4, alpha=4.0), targets=TargetSpec(preset="all"),
                       training_dtype="fp32", gradient_checkpointing=False, seed=3)
    return dataclasses.replace(base, **changes)


def one_bucket():
    """8 samples of one size, 4 per step: each of 2 ranks takes 2 of every step's 4."""
    return make_toy_denoiser("eps", seed=1, config=NET), toy_dataset(8, seed=2), config()


def mixed_buckets():
    """Two sizes, repeats, 3 samples per micro-batch x 2 accumulation: uneven shares (2 + 1) and
    partial batches of 1 (one rank idles on them), LoRA+ and a cosine schedule."""
    small, large = toy_dataset(5, seed=4, size=32), toy_dataset(4, seed=5, size=48)
    data = TrainingData(latents=small.latents + large.latents, conds=small.conds + large.conds,
                        weights=[1, 2, 1, 1, 1.5, 1, 2, 1, 1])
    return (make_toy_denoiser("flow", seed=6, config=NET), data,
            config(batch_size=3, grad_accumulation_steps=2, steps=5, lr_scheduler="cosine", loraplus_ratio=4.0))


CASES = {"one_bucket": one_bucket, "mixed_buckets": mixed_buckets}
