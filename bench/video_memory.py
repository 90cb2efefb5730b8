"""Benchmark: memory of one video LoRA training step on Wan 2.1 (1.3B width) by frames x resolution.

    COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/video_memory.py
    COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/video_memory.py --layers 30 --device cuda   # whole model

The model is ComfyUI's own WanModel at the width of Wan 2.1 T2V 1.3B (dim 1536, ffn 8960, 12 heads, umT5
context 512 x 4096) with seeded random weights; `--layers` blocks (30 in the real model; 1 and 2 by default,
so a CPU run takes minutes). A clip of F frames at R x R pixels is a [1, 16, 1 + (F-1)/4, R/8, R/8] latent
(Wan VAE: 4x time, 8x space), i.e. (1 + (F-1)/4) * (R/16)^2 tokens. LoRA rank 16 on every Linear, bypass
hooks, AdamW, fp32 on CPU / bf16 autocast on GPU; modes: off (no checkpointing) and all_blocks (every
block recomputed: Train LoRA's gradient_checkpointing with checkpoint_policy all_blocks).

added = peak of tensor allocations during one training step over what the built model holds (CUDA:
max_memory_allocated; CPU: the profiler's allocation events, which count exactly the tensors a GPU would).
With one and two blocks measured, `per block` = added(2) - added(1), and `30 blocks` = added(2) + 28 x per
block: the activations of the whole 1.3B model, extrapolated from the measured slope (the weights,
2.6 GiB in bf16, come on top).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
from memory_modes import import_comfy, profiled_peak  # noqa: E402

MIB = 1024 ** 2
WAN_13B = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=1536, ffn_dim=8960, freq_dim=256,
               text_dim=4096, out_dim=16, num_heads=12)
CASES = [(1, 256), (17, 256), (33, 256), (17, 384)]


def worker(options) -> dict:
    import math

    import torch

    import_comfy(options.device)
    import comfy.model_management
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    from lora_core.adapters import AdapterSpec
    from lora_core.adapters.attach import AdapterSet, attach_bypass
    from lora_core.adapters.targets import TargetSpec
    from lora_core.memory.checkpointing import GradientCheckpointing

    torch.set_num_threads(options.threads)
    # What Train LoRA's training session sets: ComfyUI then uses its differentiable RoPE.
    comfy.model_management.in_training = True
    device = torch.device(options.device)
    model = WanModel(**WAN_13B, num_layers=options.layers, operations=comfy.ops.disable_weight_init,
                     device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.requires_grad_(False)
    model.to(device)
    adapters = AdapterSet.create(model, AdapterSpec(rank=16, alpha=16), TargetSpec(preset="all"),
                                 torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    frames, side = options.frames, options.resolution
    shape = (1, 16, 1 + (frames - 1) // 4, side // 8, side // 8)
    x = torch.randn(shape, generator=generator).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    context = torch.randn(1, 512, 4096, generator=generator).to(device)
    timestep = torch.tensor([500.0], device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            out = model(x + noise, timestep, context)
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    with contextlib.ExitStack() as stack:
        stack.enter_context(attach_bypass(model, adapters))
        if options.mode == "all_blocks":
            stack.enter_context(GradientCheckpointing(model, depth=1))
        start = time.perf_counter()
        step()
        step_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            step()
            peak = torch.cuda.max_memory_allocated() - baseline
        else:
            peak = profiled_peak(step)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    return dict(frames=frames, resolution=side, layers=options.layers, mode=options.mode, peak=peak,
                tokens=tokens, latent=list(shape), step_s=step_s)


def run_case(options, frames, side, layers, mode) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--frames", str(frames), "--resolution",
               str(side), "--layers-one", str(layers), "--mode", mode, "--device", options.device,
               "--threads", str(options.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        sys.exit(f"worker {frames}x{side} {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=[f"{f}x{r}" for f, r in CASES],
                        help="FRAMESxRESOLUTION, e.g. 33x256")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layers-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        options.layers = options.layers_one
        print(json.dumps(worker(options)))
        return
    if not os.environ.get("COMFYUI_ROOT"):
        sys.exit("COMFYUI_ROOT is not set: COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/video_memory.py")
    print(f"Wan 2.1 1.3B width, LoRA rank 16 (all Linear, bypass), AdamW, device {options.device}; added MiB = "
          f"peak tensor allocations of one step over the built model")
    header = f"{'frames':>6} {'px':>5} {'latent':<18} {'tokens':>7} " + " ".join(
        f"{f'{mode} L={n}':>16}" for mode in ("off", "all_blocks") for n in options.layers)
    extra = len(options.layers) == 2 and options.layers == [1, 2]
    if extra:
        header += f" {'off/block':>10} {'off 30 blocks':>14} {'all_blocks 30':>14}"
    print(header)
    for case in options.cases:
        frames, side = (int(v) for v in case.split("x"))
        rows = {(mode, n): run_case(options, frames, side, n, mode) for mode in ("off", "all_blocks")
                for n in options.layers}
        first = next(iter(rows.values()))
        line = f"{frames:>6} {side:>5} {str(first['latent'][2:]):<18} {first['tokens']:>7} " + " ".join(
            f"{rows[(mode, n)]['peak'] / MIB:>16.0f}" for mode in ("off", "all_blocks") for n in options.layers)
        if extra:
            per_block = rows[("off", 2)]["peak"] - rows[("off", 1)]["peak"]
            ckpt_block = rows[("all_blocks", 2)]["peak"] - rows[("all_blocks", 1)]["peak"]
            line += (f" {per_block / MIB:>10.0f} {(rows[('off', 2)]['peak'] + 28 * per_block) / MIB:>14.0f}"
                     f" {(rows[('all_blocks', 2)]['peak'] + 28 * ckpt_block) / MIB:>14.0f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
