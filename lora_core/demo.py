"""`python -m lora_core.demo`: train a LoRA on a tiny built-in denoiser, no ComfyUI, no downloads.

Generates coloured shapes, encodes them with a fixed random "VAE", gives each its own random
caption embedding, trains an adapter on the toy denoiser and writes the LoRA (with metadata and
optimizer sidecar, so it can be continued with --resume) and a loss chart. It exercises the same
engine the Train LoRA node runs, so it doubles as a smoke test of an installation.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ALGORITHMS, AdapterSpec
from .errors import UserInputError
from .training.objectives import ObjectiveConfig
from .plotting import save_loss_chart
from .lorafile.resume import resume_from_file, save_checkpoint
from .adapters.targets import TargetSpec
from .toy import PARAMETRISATIONS, make_toy_denoiser, toy_dataset
from .training.loop import TrainCallbacks, TrainConfig, train


@dataclass
class DemoOutput:
    lora_path: Path
    chart_path: Path
    first_val_loss: float
    last_val_loss: float
    total_steps: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_core.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prediction", choices=PARAMETRISATIONS, default="flow", help="the toy model's parametrisation")
    parser.add_argument("--images", type=int, default=8, help="number of generated training images")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the LoRA and the chart")
    parser.add_argument("--resume", type=Path, default=None, help="a LoRA written by an earlier demo run to continue")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, print_every: int = 25) -> DemoOutput:
    data = toy_dataset(args.images, seed=args.seed)
    denoiser = make_toy_denoiser(args.prediction, seed=args.seed)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        adapter=AdapterSpec(algorithm=args.algorithm, rank=args.rank, alpha=float(args.rank), oft_block_size=4),
        # The toy net is tiny: let the adapter reach every layer, convs included.
        targets=TargetSpec(preset="all"),
        objective=ObjectiveConfig(),
        training_dtype="fp32",
        seed=args.seed,
        validation_every_steps=max(args.steps // 6, 1),
    )
    resume = resume_from_file(args.resume, denoiser, config) if args.resume else None

    started = time.perf_counter()

    def on_step(step: int, loss: float, lr: float) -> None:
        if step % print_every == 0 or step == (resume.steps_done if resume else 0) + args.steps:
            print(f"step {step:5d}  loss {loss:.4f}  lr {lr:.2e}  ({time.perf_counter() - started:.1f}s)", flush=True)

    print(f"training a {args.algorithm} (rank {args.rank}) on {args.images} generated images, "
          f"toy {args.prediction} model, {args.steps} steps", flush=True)
    result = train(denoiser, data, config, TrainCallbacks(on_step=on_step), resume=resume)

    args.out.mkdir(parents=True, exist_ok=True)
    lora_path = save_checkpoint(args.out / f"demo_{args.algorithm}_{result.total_steps}_steps.safetensors",
                                result.adapter_set, config, result.total_steps, denoiser.key_prefix,
                                result.optimizer_state, result.loss, {"base_model": f"toy-{args.prediction}"})
    chart_path = args.out / f"demo_{args.algorithm}_loss.png"
    save_loss_chart(str(chart_path), result.loss, steps=result.steps, val_loss=result.val_loss, log_scale=True,
                    title=f"toy {args.prediction} model, {args.algorithm} rank {args.rank}")
    (_, first), (_, last) = result.val_loss[0], result.val_loss[-1]
    print(f"validation loss {first:.4f} -> {last:.4f}")
    print(f"wrote {lora_path}\nwrote {chart_path}")
    return DemoOutput(lora_path, chart_path, first, last, result.total_steps)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # a few-thousand-parameter model: more threads only add overhead
    try:
        run(parse_args(argv))
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
