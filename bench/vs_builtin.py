"""Benchmark: our `Train LoRA` node against ComfyUI's built-in `TrainLoraNode`, with numbers anyone can reproduce.

    COMFYUI_ROOT=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python bench/vs_builtin.py --unet small --repeats 2
    # on a shared or small CPU add --threads 1: idle OpenMP threads spinning under contention otherwise swamp the
    # timings (and penalise whichever trainer launches more small ops); bench/gpu_check.sh runs the GPU version

What it does (issue 6): builds the same random-weight SD1.5-family UNet with ComfyUI's own classes (seeded, so
every process gets bit-identical weights), random but fixed VAE-free latents (spatially smooth, VAE scale) and one
caption per image encoded by a random-weight CLIP-L built with ComfyUI's `sd1_clip` classes. Then, per case, it runs
the built-in trainer and ours with equal settings (rank 8, AdamW, lr 5e-4, MSE, same seed and steps; fp32 on CPU,
bf16 on GPU) alternating A B A B ... in fresh processes. Each process builds the model (not timed), trains
1 + warmup + N optimizer steps and times the last N (a global optimizer-step hook stamps every step, so both
trainers are timed the same way), while a sampler thread records peak RSS (CPU) or
`torch.cuda.max_memory_allocated` (GPU). Finally one more process applies every resulting LoRA with ComfyUI's own
`comfy.sd.load_lora_for_models` and measures the eps-space denoising error on the training latents at a fixed grid
of sigmas with fixed noise, against the base model's.

Other families (issue 12): `--family sdxl` or `--family flux` builds the model with
tests/integration/family_models.py (ComfyUI's own `comfy.supported_models` classes, seeded random weights, the
family's real latent channels and conditioning: SDXL's pooled vector, Flux.1 dev's pooled vector and guidance) and
`--size tiny|wide` picks its widths: tiny is the family matrix's model, wide keeps the family's real width (SDXL:
320 base channels and 640-channel transformer level with 2 blocks; Flux.1: hidden 3072, 24 heads, MLP x4) with one
block of each kind, so it fits a CPU. Captions are the family's random text-encoder outputs (one per image); the
eps-error evaluation is SD1.5-only. A trainer that fails in a case (the built-in on Flux with checkpointing off:
"modified by an inplace operation") is a FAILED row with its error, not the end of the bench.

Invariant: the two trainers see the same model weights, latents, conditionings, seed and step count; the only
thing that differs between an A and a B process is the trainer (and the settings a case names on purpose).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_NAME = "comfyui_lora_trainer"
OUR_NODE_ID = "LoRATrainer_TrainLoRA"
GIB = 1024 ** 3

# UNet configs in ComfyUI's own `unet_config` form (SD15 is what ComfyUI's model detection yields for SD1.5).
UNET_CONFIGS = {
    "full": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "small": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}

UNET_PARAMS = {"full": "859.5M", "small": "107.4M"}

FAMILIES = ("sd15", "sdxl", "flux")
# tests/integration/family_models.py entry per family, and what the "wide" size changes in its unet_config
FAMILY_MODEL = {"sdxl": "sdxl", "flux": "flux1_dev"}
WIDE_CONFIG = {
    "sdxl": dict(model_channels=320, num_head_channels=64, transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
                 transformer_depth_middle=2),
    "flux": dict(hidden_size=3072, num_heads=24, mlp_ratio=4.0, axes_dim=[16, 56, 56]),
}
# Known outcomes the bench cannot see by itself (issue 12: checked against finite differences in
# tests/integration/test_inplace_families.py): printed next to the rows they concern.
KNOWN_NOTES = {
    ("flux", "builtin", True): "runs, but its gradients are wrong: the whole-model checkpoint's recompute sees "
                               "tensors Flux's in-place adds already changed (issue 12)",
}

# Fraction of the schedule (ComfyUI `percent_to_sigma`: 0 = most noise) at which the eps error is measured.
EVAL_PERCENTS = [0.1, 0.3, 0.5, 0.7, 0.9]


@dataclass
class Case:
    """One row of the table: the settings both trainers get, plus per-trainer overrides."""
    name: str
    batch_size: int
    builtin: dict = field(default_factory=dict)   # overrides for the built-in node
    ours: dict = field(default_factory=dict)      # overrides for our node
    weight_dtype: str = ""                        # "" = the run's default (fp32 CPU / bf16 GPU); "fp8" = float8_e4m3fn


def make_cases(device: str) -> dict[str, Case]:
    if device == "cpu":
        dtypes = {"training_dtype": "fp32", "lora_dtype": "fp32"}
    else:
        dtypes = {"training_dtype": "bf16", "lora_dtype": "bf16"}
    fp8 = {"training_dtype": "none", "lora_dtype": "bf16", "bypass_mode": True}
    return {
        # each trainer's defaults (built-in: checkpointing on at depth 1, weight-wrapper mode)
        "b1": Case("b1", 1, dict(dtypes), dict(dtypes)),
        "b4": Case("b4", 4, dict(dtypes), dict(dtypes)),
        # the built-in's fastest configuration vs ours at its defaults
        "fastest": Case("fastest", 1, dict(dtypes, bypass_mode=True, gradient_checkpointing=False), dict(dtypes)),
        # diagnostic: ours made to train exactly what the built-in trains (plus bias and norm diffs)
        "b1_alltargets": Case("b1_alltargets", 1, dict(dtypes), dict(dtypes, train_norms_and_biases=True)),
        # diagnostics: ours at the built-in's scale (alpha 1: with the kohya/PEFT zero-up init it moves the output
        # about 8x less per Adam step), and ours on attention + MLP layers only (our former default)
        "b1_ours_alpha1": Case("b1_ours_alpha1", 1, dict(dtypes), dict(dtypes, alpha=1.0)),
        "b1_ours_attn_mlp": Case("b1_ours_attn_mlp", 1, dict(dtypes), dict(dtypes, target_preset="attention_mlp")),
        # like fastest, with checkpointing off on both sides
        "fastest_nogc": Case("fastest_nogc", 1, dict(dtypes, bypass_mode=True, gradient_checkpointing=False),
                             dict(dtypes, gradient_checkpointing=False)),
        # the built-in in bypass mode with its checkpointing on (the one bypass setting that runs on Flux) vs ours
        "b1_bypass": Case("b1_bypass", 1, dict(dtypes, bypass_mode=True), dict(dtypes)),
        # GPU only: UNet stored as float8_e4m3fn, bypass, training_dtype none (compare with b1 = bf16)
        "fp8": Case("fp8", 1, dict(fp8), dict(fp8), weight_dtype="fp8"),
    }


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI setup (worker processes only)
# ----------------------------------------------------------------------------------------------------------------

def import_comfy(device: str, base_dir: str):
    """Import ComfyUI the way its unit tests do: sys.path + `comfy.cli_args` flags set before model_management."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not os.path.isfile(os.path.join(root, "comfy", "cli_args.py")):
        sys.exit("COMFYUI_ROOT must point at a ComfyUI checkout (the folder holding comfy/ and main.py), "
                 "e.g. COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/vs_builtin.py")
    sys.path.insert(0, os.path.abspath(root))
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    args.base_directory = base_dir
    import folder_paths  # noqa: F401  (reads args.base_directory at import: loras etc. live under base_dir)
    import comfy.model_management  # noqa: F401


def build_model(unet: str, weight_dtype, seed: int = 1234):
    """A ModelPatcher around a random-weight SD1.5-family UNet; weights depend only on `seed` and the config."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET_CONFIGS[unet]))
    manual_cast = None
    if weight_dtype == torch.float8_e4m3fn:
        manual_cast = torch.bfloat16
    config.set_inference_dtype(weight_dtype, manual_cast)
    model = config.get_model({})
    # ComfyUI's ops skip weight init (weights come from files); draw them ourselves, in a fixed order, with the
    # same distribution torch's default init uses (uniform +-1/sqrt(fan_in)), norms at identity.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            if param.ndim >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())
                value = (torch.rand(param.shape, generator=gen) * 2 - 1) * bound
            elif name.endswith("bias"):
                value = torch.zeros(param.shape)
            else:
                value = torch.ones(param.shape)
            param.copy_(value.to(param.dtype))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    # ComfyUI's loaders register how to load the model again; `clone(force_deepcopy=True)` (the built-in trainer)
    # uses it to get a second, independent copy. Ours rebuilds the same seeded weights, as a reload from file would.
    patcher.cached_patcher_init = (_rebuild_model, (unet, weight_dtype, seed))
    return patcher


def _rebuild_model(unet, weight_dtype, seed, disable_dynamic=False):
    return build_model(unet, weight_dtype, seed)


def family_spec(family: str, size: str):
    """The tests/integration/family_models.py `Family` for `--family` / `--size` (imported after ComfyUI)."""
    import dataclasses
    sys.path.insert(0, os.path.join(REPO_DIR, "tests", "integration"))
    import family_models
    spec = family_models.BY_NAME[FAMILY_MODEL[family]]
    if size == "wide":
        spec = dataclasses.replace(spec, unet_config=dict(spec.unet_config, **WIDE_CONFIG[family]))
    return family_models, spec


def build_family_model(family: str, size: str, weight_dtype, seed: int = 1234):
    """A ModelPatcher around the family's seeded random-weight model, built by family_models with ComfyUI's classes."""
    import torch
    fm, spec = family_spec(family, size)
    manual_cast = torch.bfloat16 if weight_dtype == torch.float8_e4m3fn else None
    patcher = fm.build_patcher(spec, fm.build_state_dict(spec, seed), weight_dtype, manual_cast)
    patcher.cached_patcher_init = (_rebuild_family_model, (family, size, weight_dtype, seed))
    return patcher


def _rebuild_family_model(family, size, weight_dtype, seed, disable_dynamic=False):
    return build_family_model(family, size, weight_dtype, seed)


def build_family_dataset(family: str, size: str, num_images: int, latent_size: int, seed: int = 42):
    """Latents with the family's channels at latent_size^2, and one conditioning per image (family_models widths)."""
    import torch
    fm, spec = family_spec(family, size)
    gen = torch.Generator().manual_seed(seed)
    channels = spec.latent[0]
    coarse = torch.randn(num_images, channels, max(1, latent_size // 4), max(1, latent_size // 4), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(latent_size, latent_size), mode="bilinear",
                                             align_corners=False)
    latents = smooth + 0.3 * torch.randn(num_images, channels, latent_size, latent_size, generator=gen)
    conds = [fm.conditioning(spec, seed + i) for i in range(num_images)]
    return latents, conds


def build_dataset(num_images: int, latent_size: int, seed: int = 42):
    """Raw (VAE-scale) latents [N,4,h,w] with spatial structure, and one CLIP-L caption embedding per image."""
    import torch
    import comfy.sd1_clip

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_images, 4, latent_size // 4, latent_size // 4, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(latent_size, latent_size), mode="bilinear",
                                             align_corners=False)
    fine = torch.randn(num_images, 4, latent_size, latent_size, generator=gen)
    latents = (smooth + 0.3 * fine) / 0.18215  # SD1.5 VAE scale: process_latent_in brings it back to ~unit std

    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, param in clip.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        subjects = ["dog", "cat", "castle", "robot", "forest", "teapot", "bicycle", "lighthouse"]
        styles = ["watercolor", "photo", "pixel art", "oil painting"]
        conds = []
        for i in range(num_images):
            text = f"a {styles[i % len(styles)]} of a {subjects[i % len(subjects)]}, number {i}"
            cond, pooled = clip.encode_token_weights(tokenizer.tokenize_with_weights(text))
            conds.append([[cond.float().clone(), {"pooled_output": pooled.float().clone()}]])
    del clip
    return latents, conds


def weight_dtype_for(device: str, case: Case):
    import torch
    if case.weight_dtype == "fp8":
        return torch.float8_e4m3fn
    return torch.float32 if device == "cpu" else torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Resolving and calling the two nodes
# ----------------------------------------------------------------------------------------------------------------

def load_our_node():
    """Import the repo as the package ComfyUI would (custom_nodes/<dir>) and find the node by id."""
    init = os.path.join(REPO_DIR, "__init__.py")
    if os.path.isfile(init) and PACKAGE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE_NAME, init, submodule_search_locations=[REPO_DIR])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE_NAME] = package
        spec.loader.exec_module(package)
    elif PACKAGE_NAME not in sys.modules:
        # root __init__ not written yet: register an empty package so nodes/ imports resolve relatively
        spec = importlib.util.spec_from_loader(PACKAGE_NAME, loader=None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [REPO_DIR]
        sys.modules[PACKAGE_NAME] = package
    package = sys.modules[PACKAGE_NAME]

    mappings = getattr(package, "NODE_CLASS_MAPPINGS", None) or {}
    if OUR_NODE_ID in mappings:
        return mappings[OUR_NODE_ID]
    if hasattr(package, "comfy_entrypoint"):
        extension = asyncio.run(package.comfy_entrypoint())
        for node in asyncio.run(extension.get_node_list()):
            if node.define_schema().node_id == OUR_NODE_ID:
                return node
    for module_name in ("nodes.training_nodes", "nodes.train", "nodes.training"):
        try:
            module = importlib.import_module(f"{PACKAGE_NAME}.{module_name}")
        except ModuleNotFoundError:
            continue
        for value in vars(module).values():
            if isinstance(value, type) and hasattr(value, "define_schema"):
                try:
                    if value.define_schema().node_id == OUR_NODE_ID:
                        return value
                except Exception:  # abstract bases raise in define_schema; they are not the node we want
                    continue
    raise SystemExit(f"our node {OUR_NODE_ID} was not found under {REPO_DIR} (package {PACKAGE_NAME})")


def load_builtin_node():
    from comfy_extras.nodes_train import TrainLoraNode
    return TrainLoraNode


def call_node(node_cls, values: dict):
    """Call a V3 node's execute with every input: schema defaults, then `values` (combo options matched
    case-insensitively), wrapped in lists when the node takes input lists."""
    schema = node_cls.define_schema()
    kwargs = {}
    for inp in schema.inputs:
        name = inp.id
        if name in values:
            value = values[name]
            options = getattr(inp, "options", None)
            if options and isinstance(value, str) and value not in options:
                matches = [o for o in options if str(o).lower() == value.lower()]
                if not matches:
                    raise SystemExit(f"{schema.node_id}.{name}: {value!r} not in {options}")
                value = matches[0]
        elif getattr(inp, "default", None) is not None:
            value = inp.default
        elif getattr(inp, "optional", False):
            continue
        else:
            raise SystemExit(f"{schema.node_id}: required input {name!r} has no value in the benchmark")
        kwargs[name] = value
    if schema.node_id == OUR_NODE_ID:
        # Our knobs live on settings nodes (training_settings.py); execute takes them by name too.
        kwargs.update({name: value for name, value in values.items() if name not in kwargs})
    if schema.is_input_list:
        kwargs = {k: v if k in ("latents", "positive") else [v] for k, v in kwargs.items()}
    else:
        # a node without input lists gets one latent dict and one conditioning (one entry per image)
        if isinstance(kwargs.get("latents"), list):
            kwargs["latents"] = kwargs["latents"][0]
        if isinstance(kwargs.get("positive"), list) and kwargs["positive"] and isinstance(kwargs["positive"][0], list) \
                and kwargs["positive"][0] and isinstance(kwargs["positive"][0][0], list):
            kwargs["positive"] = [entry for cond in kwargs["positive"] for entry in cond]
    return node_cls.execute(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------

class PeakRSS:
    """Samples this process's RSS every few ms on a thread; `peak` is the largest value seen."""

    def __init__(self, interval: float = 0.005):
        import psutil
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class StepClock:
    """A global torch optimizer-step hook: one timestamp per optimizer step, whoever's optimizer it is."""

    def __init__(self, device: str):
        import torch
        self.torch = torch
        self.sync = device != "cpu"
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []   # process CPU time (all threads): less sensitive to a shared CPU
        self._handle = None

    def _hook(self, optimizer, args, kwargs):
        if self.sync:
            self.torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self._handle = register_optimizer_step_post_hook(self._hook)
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        self._handle.remove()


class Profile:
    """With --profile: torch.profiler over the whole node call (timings are then not comparable)."""

    def __init__(self, opts):
        self.enabled = opts.profile
        self.device = opts.device
        self.profiler = None

    def __enter__(self):
        if self.enabled:
            import torch.profiler as tp
            activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.device != "cpu" else [])
            self.profiler = tp.profile(activities=activities, profile_memory=True, with_stack=False)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.profiler is not None:
            self.profiler.__exit__(*exc)

    def write(self, path: str):
        if self.profiler is None:
            return
        averages = self.profiler.key_averages()
        with open(path, "w") as f:
            for key in ("self_cpu_time_total", "cpu_time_total", "self_cpu_memory_usage"):
                f.write(f"== sorted by {key}\n")
                f.write(averages.table(sort_by=key, row_limit=30, max_name_column_width=60) + "\n\n")


# ----------------------------------------------------------------------------------------------------------------
# Worker: train once
# ----------------------------------------------------------------------------------------------------------------

def worker_train(opts):
    case = make_cases(opts.device)[opts.case]
    base_dir = tempfile.mkdtemp(prefix="vs_builtin_comfy_")
    import_comfy(opts.device, base_dir)
    import torch
    import safetensors.torch

    if opts.threads:
        torch.set_num_threads(opts.threads)

    torch.manual_seed(0)
    impl = opts.impl
    node = load_builtin_node() if impl == "builtin" else load_our_node()
    latent_size = opts.resolution // 8
    if opts.family == "sd15":
        latents, conds = build_dataset(opts.images, latent_size)
        model = build_model(opts.unet, weight_dtype_for(opts.device, case))
    else:
        latents, conds = build_family_dataset(opts.family, opts.size, opts.images, latent_size)
        model = build_family_model(opts.family, opts.size, weight_dtype_for(opts.device, case))
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    overrides = case.builtin if opts.slot == "builtin" else case.ours

    total_steps = 1 + opts.warmup + opts.steps
    # one LATENT and one CONDITIONING per image: what ComfyUI's Make Training Dataset hands both trainers
    values = dict(model=model, latents=[{"samples": x[None]} for x in latents], positive=conds, steps=total_steps,
                  batch_size=case.batch_size, learning_rate=5e-4, rank=8, optimizer="AdamW", loss_function="MSE",
                  seed=opts.seed, algorithm="lora", gradient_checkpointing=True, grad_accumulation_steps=1)
    # Alpha and target layers stay each trainer's default (issue 6: "with each trainer's default settings"). The
    # built-in: alpha 1 with its random-up / zero-down init, every Linear/Conv plus bias and norm diffs. Ours:
    # alpha = rank (scale 1) with the kohya/PEFT zero-up init, every Linear/Conv. Per Adam step at equal lr the two
    # inits move a layer's output about equally far (see README, "Against ComfyUI's built-in Train LoRA").
    values.update(overrides)
    if opts.slot == "ours":
        values.update(parse_settings(opts.ours_set))

    if opts.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cuda_before = torch.cuda.memory_allocated() if opts.device != "cpu" else None
    rss_before = PeakRSS().peak
    result_path = os.path.join(opts.out_dir, f"{opts.tag}.json")
    clock = StepClock(opts.device)
    try:
        with PeakRSS() as rss, clock, Profile(opts) as profile:
            output = call_node(node, values)
    except Exception as exc:  # a trainer failing on a family is a result (a FAILED row), not a bench crash
        import traceback
        traceback.print_exc()
        with open(result_path, "w") as f:
            json.dump(dict(tag=opts.tag, case=opts.case, slot=opts.slot, impl=impl, params=params,
                           gradient_checkpointing=values.get("gradient_checkpointing"),
                           steps_done=len(clock.stamps), error=f"{type(exc).__name__}: {exc}"[:300]), f)
        return
    profile.write(os.path.join(opts.out_dir, f"{opts.tag}_profile.txt"))
    lora = output.args[0] if hasattr(output, "args") else output[0]
    loss_map = output.args[1] if hasattr(output, "args") else output[1]

    if len(clock.stamps) != total_steps:
        raise SystemExit(f"{impl}: expected {total_steps} optimizer steps, saw {len(clock.stamps)}")
    durations = [b - a for a, b in zip([clock.start] + clock.stamps[:-1], clock.stamps)]
    timed = durations[1 + opts.warmup:]
    cpu = [b - a for a, b in zip([clock.cpu_start] + clock.cpu_stamps[:-1], clock.cpu_stamps)]

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in lora.items() if isinstance(v, torch.Tensor)}
    lora_path = os.path.join(opts.out_dir, f"{opts.tag}.safetensors")
    safetensors.torch.save_file(tensors, lora_path)
    result = dict(
        tag=opts.tag, case=opts.case, slot=opts.slot, impl=impl, steps=total_steps, params=params,
        gradient_checkpointing=values.get("gradient_checkpointing"), timed_steps=timed, timed_cpu=cpu[1 + opts.warmup:],
        first_step_s=durations[0], rss_before=rss_before, rss_peak=rss.peak,
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        cuda_peak=torch.cuda.max_memory_allocated() if opts.device != "cpu" else None, cuda_before=cuda_before,
        lora_path=lora_path, lora_tensors=len(tensors),
        loss=[float(x) for x in (loss_map.get("loss", []) if isinstance(loss_map, dict) else [])],
    )
    with open(result_path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------------
# Worker: evaluate every LoRA of a case with ComfyUI's own loader
# ----------------------------------------------------------------------------------------------------------------

def worker_eval(opts):
    case = make_cases(opts.device)[opts.case]
    base_dir = tempfile.mkdtemp(prefix="vs_builtin_comfy_")
    import_comfy(opts.device, base_dir)
    import torch
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    latent_size = opts.resolution // 8
    latents, conds = build_dataset(opts.images, latent_size)
    base = build_model(opts.unet, weight_dtype_for(opts.device, case))
    device = mm.get_torch_device()
    sampling = base.model.model_sampling
    x0 = base.model.process_latent_in(latents).to(device)
    context = torch.cat([c[0][0] for c in conds]).to(device)
    gen = torch.Generator().manual_seed(777)
    grid = []
    for p in EVAL_PERCENTS:
        sigma = float(sampling.percent_to_sigma(p))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        grid.append((sigma, noise))

    def errors(patcher):
        mm.load_models_gpu([patcher], force_full_load=True)
        eps_err, x0_err = [], []
        with torch.no_grad():
            for sigma, noise in grid:
                s = torch.full((x0.shape[0],), sigma, device=device)
                x_t = sampling.noise_scaling(s, noise, x0)
                denoised = patcher.model.apply_model(x_t, s, c_crossattn=context).float()
                eps = (x_t - denoised) / sigma
                eps_err.append(torch.mean((eps - noise) ** 2).item())
                x0_err.append(torch.mean((denoised - x0) ** 2).item())
        mm.unload_all_models()
        return eps_err, x0_err

    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    results = {"base": dict(zip(("eps", "x0"), errors(base)))}
    for path in opts.loras:
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched = len(comfy.lora.load_lora(lora, key_map, log_missing=False))
        model, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
        eps_err, x0_err = errors(model)
        results[path] = dict(eps=eps_err, x0=x0_err, patched_weights=patched)
        del model
    results["sigmas"] = [s for s, _ in grid]
    with open(opts.eval_out, "w") as f:
        json.dump(results, f)


# ----------------------------------------------------------------------------------------------------------------
# Orchestrator
# ----------------------------------------------------------------------------------------------------------------

def parse_settings(items: list[str]) -> dict:
    """`--ours-set alpha=8 target_preset=all`: node input values for our slot (JSON where it parses, else text)."""
    settings = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--ours-set expects KEY=VALUE, got {item!r}")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


def spawn(opts, extra: list[str], fatal: bool = True) -> bool:
    cmd = [sys.executable, os.path.abspath(__file__), "--unet", opts.unet, "--resolution", str(opts.resolution),
           "--images", str(opts.images), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
           "--seed", str(opts.seed), "--device", opts.device, "--out-dir", opts.out_dir,
           "--family", opts.family, "--size", opts.size] + extra
    if opts.profile:
        cmd.append("--profile")
    for item in opts.ours_set or []:
        cmd += ["--ours-set", item]
    print("  $", " ".join(extra), flush=True)
    env = dict(os.environ)
    if opts.threads:
        # one thread per process: on a shared CPU, idle OpenMP threads spinning at barriers otherwise dominate
        env.update(OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
        cmd += ["--threads", str(opts.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        if fatal:
            raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(extra)}")
        print(f"  WARNING: worker failed (exit {proc.returncode}); continuing without it", flush=True)
        return False
    return True


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def summarize(opts, runs: dict, evals: dict) -> str:
    gpu = opts.device != "cpu"
    mem_key = "cuda_peak" if gpu else "rss_peak"
    mem_name = "peak VRAM" if gpu else "peak RSS"
    nan = float("nan")
    stats = {}
    lines = []
    header = (f"{'case':8} {'trainer':21} {'s/step median [min-max]':>24} {'cpu s/step':>10} {'steps/s':>8} "
              f"{mem_name + ' GiB':>14} {'+train GiB':>10} {'eps err':>8} {'x0 err':>8} {'loss 1st->last':>15}")
    lines += [header, "-" * len(header)]
    for case_name, slots in runs.items():
        ev = evals.get(case_name)
        failed = False
        for slot in ("builtin", "ours"):
            rs = [r for r in slots[slot] if "error" not in r]
            errs = [r for r in slots[slot] if "error" in r]
            first = (rs or errs)[0]
            note = KNOWN_NOTES.get((opts.family, first["impl"], bool(first.get("gradient_checkpointing"))))
            if errs:
                failed = True
                lines.append(f"{case_name:8} {slot:21} FAILED in {len(errs)} of {len(slots[slot])} runs (after "
                             f"{errs[0]['steps_done']} optimizer steps): {errs[0]['error']}")
            if not rs:
                continue
            if note:
                lines.append(f"{case_name:8} {slot:21} note: {note}")
            wall = [t for r in rs for t in r["timed_steps"]]
            cpu = [t for r in rs for t in r["timed_cpu"]]
            mem = statistics.median(r[mem_key] for r in rs)
            extra = statistics.median(r[mem_key] - r["cuda_before" if gpu else "rss_before"] for r in rs)
            eps = statistics.median(statistics.mean(ev[r["lora_path"]]["eps"]) for r in rs) if ev else nan
            x0 = statistics.median(statistics.mean(ev[r["lora_path"]]["x0"]) for r in rs) if ev else nan
            st = stats[(case_name, slot)] = dict(wall=statistics.median(wall), cpu=statistics.median(cpu), mem=mem,
                                                 eps=eps, x0=x0)
            loss = rs[0]["loss"]
            label = slot if rs[0]["impl"] == slot else f"{slot} (is {rs[0]['impl']})"
            loss_text = f"{loss[0]:.3f}->{loss[-1]:.3f}" if loss else "n/a"
            lines.append(f"{case_name:8} {label:21} {spread(wall):>24} {st['cpu']:10.3f} {1 / st['wall']:8.3f} "
                         f"{mem / GIB:14.2f} {extra / GIB:10.2f} {eps:8.4f} {x0:8.4f} {loss_text:>15}")
        if failed or (case_name, "builtin") not in stats or (case_name, "ours") not in stats:
            lines.append(f"{case_name:8} {'ratio ours/built-in':21} n/a: a trainer failed")
            lines.append("")
            continue
        b, o = stats[(case_name, "builtin")], stats[(case_name, "ours")]
        lines.append(f"{case_name:8} {'ratio ours/built-in':21} {'speed ' + format(b['wall'] / o['wall'], '.2f') + 'x':>24} "
                     f"{format(b['cpu'] / o['cpu'], '.2f') + 'x':>10} {'':8} {'mem ' + format(o['mem'] / b['mem'], '.2f') + 'x':>14} "
                     f"{'':10} {format(o['eps'] / b['eps'], '.3f') + 'x':>8} {format(o['x0'] / b['x0'], '.3f') + 'x':>8}")
        if ev:
            lines.append(f"{case_name:8} {'base model, no LoRA':21} {'':24} {'':10} {'':8} {'':14} {'':10} "
                         f"{statistics.mean(ev['base']['eps']):8.4f} {statistics.mean(ev['base']['x0']):8.4f}")
        lines.append("")
    lines.append("speed = built-in s/step / ours s/step (wall; cpu column: process CPU seconds); mem and err = ours / "
                 "built-in")
    lines.append("Targets:")

    def target(ok: bool, text: str):
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    for case_name in ("b1", "b4"):
        if (case_name, "ours") not in stats or (case_name, "builtin") not in stats:
            continue
        b, o = stats[(case_name, "builtin")], stats[(case_name, "ours")]
        target(b["wall"] >= 1.5 * o["wall"], f"{case_name}: ours steps/s >= 1.5x built-in: {b['wall'] / o['wall']:.2f}x "
                                             f"(cpu-time {b['cpu'] / o['cpu']:.2f}x)")
        target(o["mem"] <= 0.7 * b["mem"], f"{case_name}: ours {mem_name} <= 0.7x built-in: {o['mem'] / b['mem']:.2f}x")
        if not math.isnan(o["eps"]):
            target(o["eps"] < b["eps"], f"{case_name}: ours eps error < built-in after {opts.total_steps} steps: "
                                        f"{o['eps']:.4f} vs {b['eps']:.4f}")
    if ("fastest", "ours") in stats and ("fastest", "builtin") in stats:
        b, o = stats[("fastest", "builtin")], stats[("fastest", "ours")]
        target(o["wall"] <= b["wall"], f"fastest: ours (defaults) not slower than built-in bypass + no checkpointing: "
                                       f"{b['wall'] / o['wall']:.2f}x (cpu-time {b['cpu'] / o['cpu']:.2f}x)")
    if all((c, t) in stats for c in ("fp8", "b1") for t in ("builtin", "ours")):
        lines.append("")
        lines.append("FP8 (UNet float8_e4m3fn, bypass, training_dtype none) vs case b1 (bf16 weights):")
        for slot in ("builtin", "ours"):
            f8, bf = stats[("fp8", slot)], stats[("b1", slot)]
            lines.append(f"  {slot:8} steps/s {1 / f8['wall']:.3f} vs {1 / bf['wall']:.3f} ({bf['wall'] / f8['wall']:.2f}x), "
                         f"{mem_name} {f8['mem'] / GIB:.2f} vs {bf['mem'] / GIB:.2f} GiB ({f8['mem'] / bf['mem']:.2f}x)")
    return "\n".join(lines)


def orchestrate(opts):
    if not os.environ.get("COMFYUI_ROOT"):
        sys.exit("COMFYUI_ROOT is not set: point it at a ComfyUI checkout and run with that checkout's venv python, "
                 "e.g. COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python bench/vs_builtin.py")
    if opts.device == "auto":
        import torch
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    opts.out_dir = opts.out_dir or tempfile.mkdtemp(prefix="vs_builtin_")
    os.makedirs(opts.out_dir, exist_ok=True)
    opts.total_steps = 1 + opts.warmup + opts.steps
    if opts.family != "sd15" and not opts.no_eval:
        print("note: the eps-error evaluation is SD1.5-only; --no-eval implied for", opts.family)
        opts.no_eval = True
    # "b4:1" runs case b4 with 1 repeat instead of --repeats
    cases = [(c.split(":")[0], int(c.split(":")[1]) if ":" in c else opts.repeats) for c in opts.cases.split(",") if c]
    known = make_cases(opts.device)
    unknown = [c for c, _ in cases if c not in known]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}: choose from {', '.join(known)}")
    if opts.device == "cpu" and "fp8" in dict(cases):
        print("note: the fp8 case is meant for GPUs; on CPU it only checks that both trainers run it")
    print(f"device={opts.device} family={opts.family} size={opts.size} unet={opts.unet} {opts.resolution}px ({opts.resolution // 8}x{opts.resolution // 8} "
          f"latents) images={opts.images} steps={opts.total_steps} (timed {opts.steps}, warmup {opts.warmup} + 1) "
          f"cases={cases} ours={opts.ours_impl} ours-set={opts.ours_set} threads={opts.threads or 'torch default'} "
          f"out={opts.out_dir}", flush=True)

    runs: dict = {}
    evals: dict = {}
    for case_name, repeats in cases:
        print(f"case {case_name}: {known[case_name]}", flush=True)
        runs[case_name] = {"builtin": [], "ours": []}
        for rep in range(repeats):
            for slot in ("builtin", "ours"):   # A B A B ...: each in a fresh process
                impl = "builtin" if slot == "builtin" else opts.ours_impl
                tag = f"{case_name}_{slot}_{rep}"
                spawn(opts, ["--worker", "train", "--case", case_name, "--slot", slot, "--impl", impl, "--tag", tag])
                with open(os.path.join(opts.out_dir, f"{tag}.json")) as f:
                    result = json.load(f)
                runs[case_name][slot].append(result)
                if "error" in result:
                    print(f"    {tag}: FAILED after {result['steps_done']} steps: {result['error']}", flush=True)
                    continue
                print(f"    {tag}: median {statistics.median(result['timed_steps']):.3f} s/step "
                      f"(cpu {statistics.median(result['timed_cpu']):.3f}), "
                      f"peak {(result['cuda_peak'] or result['rss_peak']) / GIB:.2f} GiB", flush=True)
        if not opts.no_eval:
            paths = [r["lora_path"] for slot in ("builtin", "ours") for r in runs[case_name][slot] if "lora_path" in r]
            eval_out = os.path.join(opts.out_dir, f"eval_{case_name}.json")
            if spawn(opts, ["--worker", "eval", "--case", case_name, "--eval-out", eval_out, "--loras", *paths],
                     fatal=False):
                with open(eval_out) as f:
                    evals[case_name] = json.load(f)
        # the table so far, so an interrupted run still leaves its finished cases
        table = summarize(opts, runs, evals)
        with open(os.path.join(opts.out_dir, "summary.json"), "w") as f:
            json.dump({"args": vars(opts), "runs": runs, "evals": evals, "table": table}, f)
        with open(os.path.join(opts.out_dir, "table.txt"), "w") as f:
            f.write(table + "\n")

    print()
    if opts.family == "sd15":
        model_text = f"{opts.unet} SD1.5 UNet ({UNET_PARAMS.get(opts.unet, '?')} params)"
    else:
        counts = {r["params"] for slots in runs.values() for rs in slots.values() for r in rs if "params" in r}
        model_text = (f"{opts.size} {opts.family} model ({FAMILY_MODEL[opts.family]} of family_models"
                      f"{', wide widths' if opts.size == 'wide' else ''}; "
                      f"{'/'.join(f'{c / 1e6:.1f}M' for c in sorted(counts))} params)")
    try:
        load = "load average %.1f %.1f %.1f on %d CPUs" % (*os.getloadavg(), os.cpu_count())
    except OSError:
        load = "load average n/a"
    print(f"ours vs ComfyUI built-in TrainLoraNode: {model_text}, {opts.resolution}px, {opts.device} ({load} at "
          f"the end), rank 8 (alpha: each "
          f"trainer's default), "
          f"AdamW lr 5e-4, MSE, {opts.total_steps} optimizer steps per run ({opts.steps} timed), "
          f"runs per case {dict(cases)}, A/B alternated in fresh processes, "
          f"threads {opts.threads or 'torch default'}")
    if opts.family != "sd15":
        print("captions: random text-encoder outputs at the family's widths (family_models.conditioning), one per "
              "image; eps/x0 err: not measured for this family (SD1.5 only)")
    else:
        print("eps/x0 err: mean squared error of the model's eps (x0) prediction on the training latents, sigmas at "
              f"percent {EVAL_PERCENTS} with fixed noise; captions: random-weight CLIP-L (ComfyUI sd1_clip), one per image")
    print(table)
    print(f"\nraw results: {os.path.join(opts.out_dir, 'summary.json')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="sd15",
                        help="model family: sd15 (--unet picks its size) or sdxl / flux (tests/integration/family_models.py)")
    parser.add_argument("--size", choices=["tiny", "wide"], default="tiny",
                        help="sdxl / flux: tiny (the family matrix's model) or wide (the family's real width, 1 block each)")
    parser.add_argument("--unet", choices=sorted(UNET_CONFIGS), default="full", help="sd15 only: UNet size")
    parser.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution/8")
    parser.add_argument("--images", type=int, default=8, help="training images (one caption each)")
    parser.add_argument("--steps", type=int, default=39,
                        help="timed optimizer steps per run (total = 1 + warmup + steps; the eps error is compared "
                             "after the total: at 8 steps both LoRAs mostly shrink the random model's output, see README)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (first is never timed)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per trainer and case, alternated A B A B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="b1,fastest", help="comma list of b1,b4,fastest,b1_alltargets,b1_ours_alpha1,b1_ours_attn_mlp,fastest_nogc,b1_bypass,fp8; "
                        "case:N runs that case N times instead of --repeats")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--ours-impl", default="ours", choices=["ours", "builtin"],
                        help="run the built-in in our slot too (to check the bench itself)")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of our node's inputs in every case (repeatable), e.g. --ours-set alpha=8")
    parser.add_argument("--no-eval", action="store_true", help="skip the eps-error evaluation")
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per worker (0 = torch default); 1 gives steadier numbers on a busy CPU")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler tables per run in the out dir (timings then include profiler overhead)")
    # worker-only
    parser.add_argument("--worker", choices=["train", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--slot", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--eval-out", help=argparse.SUPPRESS)
    parser.add_argument("--loras", nargs="*", default=[], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker == "train":
        worker_train(opts)
    elif opts.worker == "eval":
        worker_eval(opts)
    else:
        orchestrate(opts)


if __name__ == "__main__":
    main()
