"""Benchmark: peak memory and step time of the memory modes on a ComfyUI SD1.5-family UNet.

    COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/memory_modes.py --unet small
    COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/memory_modes.py --unet full --batch 1

Modes (LoRA rank 8 on the `--targets` preset, bypass hooks, AdamW, fp32 on CPU / bf16 autocast on GPU):
- off: no gradient checkpointing;
- whole: one checkpoint around the whole UNet (what ComfyUI's built-in trainer does at depth 1);
- block: `lora_core.memory.checkpointing.GradientCheckpointing` at depth 1 (each input/middle/output block);
- auto: Train LoRA's default checkpoint_policy: blocks keep their activations (least bytes per FLOP
  first) up to the size of the model's weights, capped by half the free memory; the rest is recomputed
  (chosen on the warm-up step). `--auto-budget-mib` replaces that budget, to see the trade-off;
- block+offload: block checkpointing plus `lora_core.memory.offload.BlockOffloader`.

Each (mode, batch) runs in a fresh process that builds the UNet with ComfyUI's own classes (seeded random
weights) and the adapters, then runs a warm-up step, a measured step and `--steps` timed steps.
- added: peak of tensor allocations during one training step over what the built model already holds
  (activations, saved tensors, gradients, optimizer state and, with offloading, the per-block weight
  copies). CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; CPU: running sum of
  the profiler's allocation events (`profile_memory=True`), which counts exactly the tensors a GPU would.
- on device: frozen weights kept on the compute device (the whole UNet; with offloading only the layers
  outside the blocks, the blocks being in `added`) + added: what a GPU holds at the peak.
- RSS: peak RSS (`ru_maxrss`) growth over the warm-up step (CPU only; includes allocator fragmentation,
  which the per-block copies of offloading inflate on a CPU run).

Invariant: every mode sees the same weights, latents, noise, timesteps and adapters (one seed), so the
first-step losses agree and only memory and time differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("off", "whole", "block", "auto", "block+offload")
MIB = 1024 ** 2

UNET_CONFIGS = {
    # ComfyUI's SD15 unet_config (as model detection yields for SD1.5)
    "full": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768, num_heads=8,
        use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
        use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False,
    ),
    # same widths, two levels, one res block per level
    "small": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
        channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1], context_dim=768, num_heads=8,
        use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
        use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False,
    ),
}


def import_comfy(device: str):
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not os.path.isfile(os.path.join(root, "comfy", "cli_args.py")):
        sys.exit("COMFYUI_ROOT must point at a ComfyUI checkout (the folder holding comfy/), e.g. "
                 "COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/memory_modes.py")
    sys.path.insert(0, os.path.abspath(root))
    sys.path.insert(0, REPO_DIR)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    import comfy.ops  # noqa: F401


def build_unet(unet: str, seed: int):
    """ComfyUI's UNetModel with seeded weights drawn in place (uniform +-1/sqrt(fan_in), norms at identity)."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = UNetModel(**UNET_CONFIGS[unet], dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                bound = 1.0 / math.sqrt(parameter[0].numel())
                parameter.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
    model.requires_grad_(False)
    return model


def whole_model_checkpoint(model):
    """One checkpoint around the whole forward (the built-in trainer at depth 1); returns an undo."""
    import torch
    from torch.utils.checkpoint import checkpoint

    forward = model.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    model.forward = checkpointed
    return lambda: delattr(model, "forward")


def weight_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(options) -> dict:
    import contextlib

    import torch

    import_comfy(options.device)
    from lora_core.adapters import AdapterSpec
    from lora_core.adapters.attach import AdapterSet, attach_bypass
    from lora_core.memory.checkpointing import GradientCheckpointing
    from lora_core.memory.device_memory import activation_budget
    from lora_core.memory.offload import BlockOffloader
    from lora_core.adapters.targets import TargetSpec

    torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    model = build_unet(options.unet, seed=1234).to(device)
    adapters = AdapterSet.create(model, AdapterSpec(rank=8, alpha=8), TargetSpec(preset=options.targets),
                                 torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(42)
    x = torch.randn(options.batch, 4, options.latent, options.latent, generator=generator).to(device)
    noise = torch.randn(x.shape, generator=generator).to(device)
    context = torch.randn(options.batch, 77, 768, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (options.batch,), generator=generator).to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    model_bytes = weight_bytes(model.parameters())

    def step(offloader) -> float:
        with autocast:
            prediction = model(x + noise, timesteps=timesteps, context=context)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if offloader is not None:
            offloader.release_all()  # nothing stays on the compute device between steps
        return loss.item()

    with contextlib.ExitStack() as stack:
        stack.enter_context(attach_bypass(model, adapters))
        if options.mode == "whole":
            stack.callback(whole_model_checkpoint(model))
        elif options.mode.startswith("block"):
            stack.enter_context(GradientCheckpointing(model, depth=1))
        elif options.mode == "auto":
            if options.auto_budget_mib is None:
                budget = lambda: activation_budget(model, device)  # noqa: E731
            else:
                budget = lambda: int(options.auto_budget_mib * MIB)  # noqa: E731
            stack.enter_context(GradientCheckpointing(model, depth=1, keep_budget=budget))
        offloader, resident_bytes = None, model_bytes
        if options.mode == "block+offload":
            offloader = stack.enter_context(BlockOffloader(model, device))
            resident_bytes = model_bytes - offloader.streamed_bytes()  # layers outside the blocks

        if device.type == "cuda":
            step(offloader)  # warm-up: optimizer state, allocator caches
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            first_loss = step(offloader)
            peak_added = torch.cuda.max_memory_allocated() - baseline
            rss_added = 0
        else:
            # Baseline: model, adapters and inputs built. RSS over the warm-up step; the exact peak
            # of tensor allocations from the profiler's allocation events on a later step.
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            first_loss = step(offloader)
            rss_added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
            peak_added = profiled_peak(lambda: step(offloader))
        times = []
        for _ in range(options.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(offloader)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return dict(mode=options.mode, batch=options.batch, peak=peak_added, rss=rss_added, step_s=min(times),
                first_loss=first_loss, model_bytes=model_bytes, resident_bytes=resident_bytes)


def profiled_peak(run) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU while `run` runs, from allocation events."""
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
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


def run_case(options, mode: str, batch: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--batch", str(batch),
               "--unet", options.unet, "--device", options.device, "--steps", str(options.steps),
               "--latent", str(options.latent), "--threads", str(options.threads), "--targets", options.targets]
    if options.auto_budget_mib is not None:
        command += ["--auto-budget-mib", str(options.auto_budget_mib)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        sys.exit(f"worker {mode} batch {batch} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=sorted(UNET_CONFIGS), default="small")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps (after the warm-up and measured steps)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--auto-budget-mib", type=float, default=None,
                        help="mode auto: activation MiB the blocks may keep (default: Train LoRA's own budget)")
    parser.add_argument("--targets", default="all", help="target preset of the LoRA (Train LoRA's default: all)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        options.batch = options.batch[0]
        print(json.dumps(worker(options)))
        return
    if not os.environ.get("COMFYUI_ROOT"):
        sys.exit("COMFYUI_ROOT is not set: COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/memory_modes.py")

    on_gpu = options.device.startswith("cuda")
    print(f"UNet {options.unet}, {options.latent}x{options.latent} latents, device {options.device}, "
          f"{options.threads} threads, LoRA rank 8 ({options.targets} layers, bypass), fp32 on CPU / bf16 autocast on GPU.")
    print("added = peak of tensor allocations during one training step over what the built model holds "
          f"({'max_memory_allocated' if on_gpu else 'profiler allocation events'}); on device = frozen weights "
          "kept on the compute device + added (what a GPU holds at the peak); RSS = peak RSS growth over the "
          "warm-up step (CPU only, allocator noise included)")
    print(f"{'batch':>5} {'mode':<14} {'added MiB':>10} {'vs off':>7} {'vs whole':>9} {'on device MiB':>14} "
          f"{'vs off':>7} {'RSS MiB':>8} {'step s':>7} {'vs off':>7} {'first loss':>11}")
    for batch in options.batch:
        rows = {mode: run_case(options, mode, batch) for mode in options.modes}
        off, whole = rows.get("off"), rows.get("whole")
        for mode, row in rows.items():
            total = row["resident_bytes"] + row["peak"]
            ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
            print(f"{batch:>5} {mode:<14} {row['peak'] / MIB:>10.0f} {ratio(row['peak'], off and off['peak']):>7} "
                  f"{ratio(row['peak'], whole and whole['peak']):>9} {total / MIB:>14.0f} "
                  f"{ratio(total, off and off['resident_bytes'] + off['peak']):>7} {row['rss'] / MIB:>8.0f} "
                  f"{row['step_s']:>7.2f} {ratio(row['step_s'], off and off['step_s']):>7} {row['first_loss']:>11.6f}",
                  flush=True)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
