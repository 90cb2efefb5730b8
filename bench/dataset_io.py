"""Save and load 1000 encoded samples with our dataset format; compare loading with plain safetensors.

    python bench/dataset_io.py [--samples 1000] [--captions 4] [--repeats 3]

Each sample is a 4x128x128 fp32 latent (an SD 1024 px image) and a conditioning of a 77x768
embedding plus a pooled 768 vector; a few distinct captions, each encoded separately per sample
(equal content, distinct objects) as a text encoder node would. "plain" reads the very same
shard files with `safetensors.torch.load_file`, so the ratio is the cost of our manifest checks,
per-sample shape validation and conditioning rebuild. Target: ours <= 2x plain. Writes about
0.3 GB to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_core.data import SampleInfo, load_dataset, save_dataset  # noqa: E402


def make_samples(count: int, captions: int) -> tuple[list, list, list]:
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 128, 128, generator=g) for _ in range(count)]
    embeddings = [(torch.randn(1, 77, 768, generator=g), torch.randn(1, 768, generator=g)) for _ in range(captions)]
    conds = []
    for i in range(count):
        cond, pooled = embeddings[i % captions]
        conds.append([[cond.clone(), {"pooled_output": pooled.clone()}]])
    info = [SampleInfo(caption=f"caption {i % captions}", source_file=f"img/{i:04d}.png") for i in range(count)]
    return latents, conds, info


def checksum(tensors) -> float:
    """Reads every byte, so lazily mapped tensors are really loaded."""
    return sum(float(t.sum()) for t in tensors)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    latents, conds, info = make_samples(args.samples, args.captions)
    root = Path(tempfile.mkdtemp(prefix="dataset_io_bench_"))
    try:
        start = time.perf_counter()
        folder = save_dataset(root, "bench", latents, conds, info)
        save_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.iterdir())
        shards = sorted(folder.glob("*.safetensors"))

        def plain(touch: bool = False) -> None:
            for shard in shards:
                tensors = load_file(str(shard))
                if touch:
                    checksum(tensors.values())

        def ours(touch: bool = False) -> None:
            loaded = load_dataset(root, "bench")
            if touch:
                checksum(loaded.latents)
                checksum(c[0][0] for c in loaded.conds)

        plain(touch=True)  # warm the page cache for both
        plain_s = best_of(args.repeats, plain)
        ours_s = best_of(args.repeats, ours)
        plain_touch_s = best_of(args.repeats, lambda: plain(touch=True))
        ours_touch_s = best_of(args.repeats, lambda: ours(touch=True))
        loaded = load_dataset(root, "bench")
        exact = all(torch.equal(a, b) for a, b in zip(latents, loaded.latents))

        print(f"samples            {args.samples} (latent 4x128x128 fp32, cond 77x768 + pooled 768, "
              f"{args.captions} captions)")
        print(f"on disk            {size / 2**20:.1f} MiB in {len(shards)} shards "
              f"(conditioning deduplicated to {args.captions} entries)")
        print(f"save               {save_s:.2f} s ({size / 2**20 / save_s:.0f} MiB/s)")
        print(f"load, plain        {plain_s:.3f} s (safetensors.torch.load_file on the same shards)")
        print(f"load, ours         {ours_s:.3f} s (manifest checks, shapes, conditioning rebuilt)")
        print(f"ratio ours/plain   {ours_s / plain_s:.2f}x (target <= 2x)")
        print(f"load + read bytes  plain {plain_touch_s:.3f} s, ours {ours_touch_s:.3f} s, "
              f"ratio {ours_touch_s / plain_touch_s:.2f}x (tensors come memory-mapped; this touches every byte)")
        print(f"round trip exact   {exact}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
