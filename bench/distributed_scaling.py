"""Steps per second of the headless runner with 1, 2, ... processes (torchrun, data parallel).

Every configuration trains the same job with the same global batch (so every row computes the same
LoRA); a row with N processes gives each 1/N of every step's samples. The clock runs from the log
line of step `--warmup` to the last one, so start-up, model loading and the first steps (which
measure checkpointing) are left out. Rows run one after another, `--repeats` times interleaved,
and the table shows medians and the speed-up over one process.

    python bench/distributed_scaling.py                       # toy job, CPU: 1 process, then 2
    python bench/distributed_scaling.py --nproc 1 2 4 8 --job JOB --comfyui /path/to/ComfyUI   # a real job

Without --job a toy job is generated (a toy denoiser, 64 px images, global batch 8). On a CPU each
process gets `--threads` threads (1 by default, so 2 processes use the two cores one process leaves
half idle); on GPUs each process takes the GPU of its local rank.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_core.adapters import AdapterSpec  # noqa: E402
from lora_core.adapters.targets import TargetSpec  # noqa: E402
from lora_core.toy import ToyNetConfig, write_toy_job  # noqa: E402
from lora_core.training.loop import TrainConfig  # noqa: E402

STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")


def toy_job(folder: Path, steps: int, batch: int) -> Path:
    config = TrainConfig(steps=steps, batch_size=batch, learning_rate=1e-3, adapter=AdapterSpec(rank=8, alpha=8.0),
                         targets=TargetSpec(preset="all"), training_dtype="fp32", gradient_checkpointing=False)
    return write_toy_job(folder, config, images=2 * batch, size=64, net=ToyNetConfig(width=64, depth=4, cond_dim=8))


def run(job: Path, nproc: int, threads: int, warmup: int, extra: list[str]) -> float:
    """Steps per second between the `warmup` step's log line and the last one."""
    out = Path(tempfile.mkdtemp(prefix="scaling-out-"))
    runner = [sys.executable, str(ROOT / "headless.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         str(ROOT / "headless.py")]
    cmd = [*runner, str(job), "--fresh", "--no-progress", "--log-every", "1", "--output-dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen: dict[int, float] = {}
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.match(line)
        if match:
            seen[int(match.group(1))] = time.perf_counter()
    if proc.wait() != 0 or warmup not in seen:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(lines[-40:])}")
    last = max(seen)
    return (last - warmup) / (seen[last] - seen[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per process on CPU (default 1)")
    parser.add_argument("--steps", type=int, default=40, help="steps of the generated toy job")
    parser.add_argument("--batch", type=int, default=8, help="global batch of the generated toy job")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--job", type=Path, default=None, help="an exported job instead of the toy one")
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder, for a --job on a ComfyUI model")
    parser.add_argument("--comfyui-args", default="", help="ComfyUI flags, e.g. \"--cpu\"")
    args = parser.parse_args()

    job = args.job or toy_job(Path(tempfile.mkdtemp(prefix="scaling-job-")) / "job", args.steps, args.batch)
    extra = []
    if args.comfyui is not None:
        extra += ["--comfyui", str(args.comfyui), "--comfyui-args", args.comfyui_args]
    rates: dict[int, list[float]] = {n: [] for n in args.nproc}
    for _ in range(args.repeats):
        for n in args.nproc:
            rates[n].append(run(job, n, args.threads, args.warmup, extra))
            print(f"  {n} process(es): {rates[n][-1]:.2f} steps/s", flush=True)
    base = statistics.median(rates[args.nproc[0]])
    print(f"\njob {job} ({'toy' if args.job is None else 'exported'}), {args.threads} thread(s) per process")
    print("| processes | steps/s (median) | speed-up vs " + f"{args.nproc[0]} |")
    print("|---|---|---|")
    for n in args.nproc:
        median = statistics.median(rates[n])
        print(f"| {n} | {median:.2f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
