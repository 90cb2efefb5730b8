"""Training-step cost of each adapter algorithm, bypass and merged (trainable), relative to the
frozen base model's forward + backward (input gradients only, as when nothing trains).

A stack of Linear(2048, 2048) + GELU layers stands in for a transformer's projections. Every
configuration runs interleaved with the others, several times, and the table shows median
ratios. Targets: LoRA bypass <= 1.10x, LoHa / LoKr / OFT <= 1.30x in their best mode, LoRA
bypass faster than LoRA merged.

    python bench/adapter_overhead.py [--tokens 256] [--threads 1] [--repeats 5]

One thread by default: on a shared machine OpenMP barriers make the small adapter matmuls look
up to 30x slower than they are, which measures the neighbours, not the adapters. On an idle
2-core machine `--threads 2 --tokens 512` gives a base step of about a second too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_core.adapters import ALGORITHMS, AdapterSpec  # noqa: E402
from lora_core.adapters.attach import AdapterSet, attach_bypass, attach_merged  # noqa: E402
from lora_core.adapters.targets import TargetSpec  # noqa: E402


def make_model(width: int, depth: int) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers)
    model.requires_grad_(False)
    return model


def base_step(model: nn.Module, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    model(x).square().mean().backward()


def adapter_step(model, x, adapter_set, optimizer, mode) -> None:
    attach = attach_bypass(model, adapter_set) if mode == "bypass" else attach_merged(model, adapter_set, trainable=True)
    with attach:
        loss = model(x).square().mean()
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = make_model(args.width, args.depth)
    x = torch.randn(args.tokens, args.width)
    configs = {"base": None}
    for algorithm in ALGORITHMS:
        spec = AdapterSpec(algorithm=algorithm, rank=args.rank, alpha=args.rank, oft_block_size=32)
        adapter_set = AdapterSet.create(model, spec, TargetSpec(preset="all"), torch.Generator().manual_seed(0))
        optimizer = torch.optim.AdamW(adapter_set.parameters(), lr=1e-4)
        for mode in ("bypass", "merged"):
            configs[f"{algorithm} {mode}"] = (adapter_set, optimizer, mode)

    def run(name):
        if configs[name] is None:
            base_step(model, x)
        else:
            adapter_step(model, x, *configs[name])

    for name in configs:  # warm-up: allocator, optimizer state
        run(name)
    wall = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name in configs:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run(name)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)

    base_wall, base_cpu = statistics.median(wall["base"]), statistics.median(cpu["base"])
    print(f"{args.depth} x Linear({args.width}, {args.width}) + GELU, {args.tokens} tokens, rank {args.rank}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats (median)")
    # CPU time of this process is what the adapters cost; wall time also counts the time other
    # processes on a shared machine held the cores.
    print(f"{'config':<16}{'cpu s':>8}{'cpu ratio':>11}{'wall s':>9}{'wall ratio':>12}")
    for name in configs:
        cpu_median, wall_median = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:<16}{cpu_median:>8.3f}{cpu_median / base_cpu:>10.2f}x{wall_median:>9.3f}{wall_median / base_wall:>11.2f}x")


if __name__ == "__main__":
    main()
