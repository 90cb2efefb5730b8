"""Benchmark: the share of a Train LoRA run spent drawing sample images, at the defaults.

    COMFYUI_ROOT=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python bench/sampling_share.py \
        [--checkpoint models/checkpoints/x.safetensors] [--steps 200] [--every 50] [--size 64] [--grid docs/x.png]

Runs the node's own `run_training` twice on the same data and seed, with one sample prompt and without:
defaults are Train LoRA's (200 steps, samples every 50 = 4 rows, LoRA Sample Settings' 20 steps, cfg 8 with
a zeroed negative, at the training size). Prints the time of each run, the sampling time measured
inside the run and its share. Without --checkpoint it uses the integration tests' tiny random-weight
SD1.5 checkpoint (built once with ComfyUI's own classes). --grid writes the `samples` grid as a PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]


def load_pack(root: str):
    sys.path.insert(0, root)
    import comfy.cli_args
    comfy.cli_args.args.cpu = os.environ.get("BENCH_DEVICE", "cpu") == "cpu"
    spec = importlib.util.spec_from_file_location("lora_trainer_pack", REPO_DIR / "__init__.py",
                                                  submodule_search_locations=[str(REPO_DIR)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lora_trainer_pack"] = pack
    spec.loader.exec_module(pack)


def training_images(count: int, size: int):
    """Coloured discs on plain backgrounds, [1, size, size, 3] in [0, 1] (ComfyUI IMAGE)."""
    import torch
    generator = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(count):
        background, colour = torch.rand(3, generator=generator) * 0.5, torch.rand(3, generator=generator)
        cx, cy = (torch.rand(2, generator=generator) * size * 0.5 + size * 0.25).tolist()
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= (size * 0.25) ** 2
        image = background[None, None, :].expand(size, size, 3).clone()
        image[mask] = colour
        images.append(image[None])
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint file (default: the tests' tiny SD1.5)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="training (and sample) image size in pixels")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--prompt", action="append", help="sample prompt (repeatable: one grid column each)")
    parser.add_argument("--at-start", action="store_true", help="also sample before the first step")
    parser.add_argument("--grid", help="write the samples grid here (PNG)")
    parser.add_argument("--threads", type=int, default=0)
    opts = parser.parse_args()

    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        sys.exit("COMFYUI_ROOT must point at a ComfyUI checkout, e.g. "
                 "COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/sampling_share.py")
    checkpoint = opts.checkpoint
    if checkpoint is None:
        sys.path.insert(0, str(REPO_DIR / "tests" / "integration"))
        from comfy_server import CHECKPOINT, build_fixture_models, comfy_python
        checkpoint = str(build_fixture_models(Path(root), comfy_python(Path(root))) / "checkpoints" / CHECKPOINT)
    load_pack(root)
    import torch
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import comfy.sd
    import folder_paths
    from lora_trainer_pack.lora_core.training.loop import TrainingData
    from lora_trainer_pack.lora_core.training.sampling import SampleSchedule
    from lora_trainer_pack.nodes import training_nodes as tn
    from lora_trainer_pack.nodes.lists import single
    from lora_trainer_pack.nodes.sample_files import png_bytes
    from lora_trainer_pack.nodes.sampling_glue import sample_request
    from lora_trainer_pack.nodes.training_settings import merged_values

    work = Path(tempfile.mkdtemp(prefix="sampling_share_"))
    (work / "loras").mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(work / "loras")], folder_paths.supported_pt_extensions)
    folder_paths.set_output_directory(str(work / "output"))

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    prompts = opts.prompt or ["a photo of sks toy"]
    with torch.no_grad():  # as ComfyUI runs nodes: no autograd graph behind the dataset
        caption = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks toy"))
        encoded = [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in prompts]
        latents = [vae.encode(image)[0].cpu() for image in training_images(opts.images, opts.size)]
    data = TrainingData(latents=latents, conds=[caption])
    values = merged_values(tn.TrainLoRA.define_schema().inputs,
                           {"steps": opts.steps, "sample_every_steps": opts.every}, single)
    values["sample_settings"].update(steps=opts.sample_steps, sample_at_start=opts.at_start)
    config = tn.train_config(values, False)
    sink = tn.SampleSink(sample_request(encoded, [], vae, values["sample_settings"], prompts), None, None)

    seconds = {}
    samples_seconds = []
    original = tn.TrainingSamples.draw

    def timed_draw(self, patcher, step):
        original(self, patcher, step)
        samples_seconds.append(self.seconds)

    tn.TrainingSamples.draw = timed_draw
    for name, sampling in (("without samples", None), ("with samples", sink)):
        start = time.perf_counter()
        output = tn.run_training(model, data, config, values, sampling)
        seconds[name] = time.perf_counter() - start
    grid = output.args[3]
    sampled = samples_seconds[-1]
    rows = SampleSchedule(opts.every, opts.at_start).steps(0, opts.steps)
    per_step = (seconds["with samples"] - sampled) / opts.steps
    per_row = sampled / len(rows)
    print(f"checkpoint {Path(checkpoint).name}, {opts.steps} steps at {opts.size} px, {opts.images} images; samples "
          f"at steps {rows} x {len(prompts)} prompt(s), {opts.sample_steps} sampler steps, cfg "
          f"{values['sample_settings']['cfg']}; device {model.load_device}, torch threads {torch.get_num_threads()}")
    print(f"run without samples {seconds['without samples']:.1f} s, with samples {seconds['with samples']:.1f} s; "
          f"sampling measured inside the run {sampled:.1f} s = {100 * sampled / seconds['with samples']:.1f}% of it "
          f"(difference of the two runs: {seconds['with samples'] - seconds['without samples']:.1f} s)")
    print(f"per training step {per_step:.3f} s, per sample row {per_row:.2f} s")
    for steps, every in ((200, 50), (1000, 250)):
        n = len(SampleSchedule(every).steps(0, steps))
        share = n * per_row / (steps * per_step + n * per_row)
        print(f"  projected for {steps} steps sampling every {every} ({n} rows): {100 * share:.1f}% of the run")
    if opts.grid:
        Path(opts.grid).write_bytes(png_bytes(grid[0]))
        print(f"grid {tuple(grid.shape)} written to {opts.grid}")


if __name__ == "__main__":
    main()
