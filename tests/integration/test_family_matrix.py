"""Every model family, trained through the Train LoRA node's own code path, in ComfyUI's Python.

For each family in `family_models.FAMILIES` (a tiny random-weight model built with ComfyUI's own
classes, conditioning of the family's real shapes, latents of its real layout) this checks:
- it trains: the validation loss (fixed noise levels and noise, so comparable across steps) on a
  fixed two-sample set falls over a few dozen steps: with the node's defaults, with bypass off,
  with checkpoint_policy all_blocks, with offloading, and on an FP8 (float8_e4m3fn) model in
  bypass mode;
- it uses the family's native objective (eps / v / flow as ComfyUI's model_sampling says) and its
  shift (Flux.1 dev: the resolution-dependent one of ComfyUI's ModelSamplingFlux node);
- its gradients are right: one step's adapter gradients through the node (SGD at learning rate 1
  from a known random LoRA, so the update is the gradient) match float64 central finite differences
  along random directions, with checkpointing off, auto, all_blocks and offloading; every
  checkpointing mode gives the unchecked run's gradients to float rounding (two steps, so `auto`'s
  kept-activation path after its measuring step is compared too);
- checkpointing finds blocks; the presets are non-empty and `all` leaves out embedders, final
  layers, modulation and norms;
- the saved LoRA loads in ComfyUI's core loader (comfy.sd.load_lora_for_models) with no
  "lora key not loaded" line, and the core-merged model's output equals our bypass output;
- existing_lora resumes: the step count adds up and the loss continues where it stopped.

Runs in-process in ComfyUI's venv:
    COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python -m pytest tests/integration/test_family_matrix.py -q
One family: add `-k flux1_dev`. Skipped without COMFYUI_ROOT.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
if not COMFYUI_ROOT:
    pytest.skip("COMFYUI_ROOT is not set: the family matrix runs inside ComfyUI's Python "
                "(COMFYUI_ROOT=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python -m pytest ...)",
                allow_module_level=True)
sys.path.insert(0, COMFYUI_ROOT)
try:
    import comfy.cli_args
except ImportError as error:  # a Python without ComfyUI's dependencies
    pytest.skip(f"ComfyUI does not import in this Python ({error}): run with ComfyUI's venv python",
                allow_module_level=True)
comfy.cli_args.args.cpu = True  # before model_management is imported

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

import family_models as fm  # noqa: E402

PACK = "lora_trainer_family_matrix_pack"
STEPS = 30
LEARNING_RATE = 5e-3
# Relative fall of the validation loss that counts as training. Flow transformers fall 5-50% in
# 30 steps; the tiny random UNets' eps / v targets (noise, from nearly pure noise at high sigma)
# need many more steps to move far, and fall about 1%. The validation loss uses fixed noise
# levels and noise, so any fall is real, not a lucky draw.
MIN_FALL = 0.005
# The node's defaults, then one change at a time. Past the first, fp32 instead of the default
# bf16: CPU autocast to bf16 is several times slower on these tiny layers and is not what the mode
# tests.
MODES = {
    "defaults": {},
    "bypass_off": {"bypass_mode": False, "training_dtype": "fp32"},
    "all_blocks": {"checkpoint_policy": "all_blocks", "training_dtype": "fp32"},
    "offloading": {"offloading": True, "training_dtype": "fp32"},
}
GRADIENT_MODES = {
    "off": {"gradient_checkpointing": False},
    "auto": {"gradient_checkpointing": True, "checkpoint_policy": "auto"},
    "all_blocks": {"gradient_checkpointing": True, "checkpoint_policy": "all_blocks"},
    "offloading": {"gradient_checkpointing": True, "offloading": True},
}
FAMILY_IDS = [f.name for f in fm.FAMILIES]


def _load_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.pop("loras", None)
    _load_pack()
    from importlib import import_module
    ns = type("Pack", (), {})()
    ns.nodes = import_module(f"{PACK}.nodes.training_nodes")
    ns.lora_nodes = import_module(f"{PACK}.nodes.lora_nodes")
    ns.glue = import_module(f"{PACK}.nodes.comfy_glue")
    ns.adapters = import_module(f"{PACK}.lora_core.adapters")
    ns.adapter_set = import_module(f"{PACK}.lora_core.adapters.adapter_set")
    ns.attach = import_module(f"{PACK}.lora_core.adapters.attach")
    ns.targets = import_module(f"{PACK}.lora_core.adapters.targets")
    ns.checkpointing = import_module(f"{PACK}.lora_core.memory.checkpointing")
    ns.files = import_module(f"{PACK}.lora_core.lorafile.files")
    ns.objectives = import_module(f"{PACK}.lora_core.training.objectives")
    ns.loop = import_module(f"{PACK}.lora_core.training.loop")
    ns.plan = import_module(f"{PACK}.lora_core.training.plan")
    ns.seeds = import_module(f"{PACK}.lora_core.training.seeds")
    ns.loras = loras
    return ns


_WEIGHTS: dict[str, dict] = {}


def weights(family) -> dict:
    if family.name not in _WEIGHTS:
        _WEIGHTS[family.name] = fm.build_state_dict(family)
    return _WEIGHTS[family.name]


def dataset(family):
    latents = [{"samples": x[None]} for x in fm.latents(family)]
    return latents, [fm.conditioning(family, 1), fm.conditioning(family, 2)]


def train(pack, patcher, family, **widgets):
    """TrainLoRA.execute as ComfyUI calls it (every input a list); returns (lora, loss_map, steps)."""
    latents, positive = dataset(family)
    values = {"steps": STEPS, "learning_rate": LEARNING_RATE, "validation_every_steps": STEPS,
              "validation_samples": 2}
    values.update(widgets)
    out = pack.nodes.TrainLoRA.execute(model=[patcher], latents=latents, positive=positive,
                                       **{k: [v] for k, v in values.items()})
    return out.args[:3]  # the 4th output is the samples grid


def assert_loss_falls(loss_map, label):
    first, last = loss_map["val_loss"][0], loss_map["val_loss"][-1]
    assert math.isfinite(last) and last < (1 - MIN_FALL) * first, f"{label}: validation loss {first:.4f} -> {last:.4f}"
    print(f"\n[family] {label}: validation loss {first:.4f} -> {last:.4f}")


def families():
    return [pytest.param(f, id=f.name) for f in fm.FAMILIES]


# ---------------------------------------------------------------------------------------------
# Trains, in every mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", families())
def test_trains(pack, family, mode):
    lora, loss_map, steps = train(pack, fm.build_patcher(family, weights(family)), family, **MODES[mode])
    assert steps == STEPS and len(loss_map["loss"]) == STEPS
    assert lora, "no adapter tensors"
    assert_loss_falls(loss_map, f"{family.name} {mode}")


@pytest.mark.parametrize("family", families())
def test_trains_fp8_bypass(pack, family):
    patcher = fm.build_patcher(family, weights(family), dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    assert any(p.dtype == torch.float8_e4m3fn for p in patcher.model.diffusion_model.parameters())
    lora, loss_map, _ = train(pack, patcher, family, training_dtype="none", bypass_mode=True)
    assert_loss_falls(loss_map, f"{family.name} fp8")


# ---------------------------------------------------------------------------------------------
# Objective and shift
# ---------------------------------------------------------------------------------------------


def _expected_sigma(family, t: float, latent_hw) -> float:
    if family.resolution_shift:
        return fm.flux_sigma(t, fm.flux_resolution_shift(latent_hw))
    s = math.exp(family.shift) if family.shift_is_mu else family.shift
    return s * t / (1 + (s - 1) * t)


@pytest.mark.parametrize("family", families())
def test_native_objective_and_shift(pack, family):
    x0 = torch.stack([x["samples"][0] for x in dataset(family)[0]])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.25, 0.75])
    objective = pack.objectives.Objective(pack.objectives.ObjectiveConfig())
    with pack.glue.training_session(fm.build_patcher(family, weights(family)), offloading=False) as denoiser:
        assert denoiser.prediction_type == family.objective
        sigma = denoiser.sigma_at(t, x0.shape)
        x_t = denoiser.add_noise(x0, noise, sigma)
        c_skip, c_out = (c.view(-1, *[1] * (x0.ndim - 1)) for c in denoiser.output_coefficients(sigma))
        target = (x0 - c_skip * x_t) / c_out
        if family.objective == "flow":
            s = sigma.view(-1, *[1] * (x0.ndim - 1))
            if family.shift is not None or family.resolution_shift:
                for i, ti in enumerate(t.tolist()):
                    assert sigma[i].item() == pytest.approx(_expected_sigma(family, ti, x0.shape[-2:]), rel=1e-4)
                assert torch.allclose(x_t, (1 - s) * x0 + s * noise, atol=1e-5)
            else:  # Cosmos: EDM sigmas; the model sees x_t / (sigma + 1), the flow point at sigma / (sigma + 1)
                assert torch.allclose(x_t, x0 + s * noise, atol=1e-4)
            assert torch.allclose(target, noise - x0, atol=1e-4)  # the flow velocity
        elif family.objective == "eps":
            assert torch.allclose(target, noise, atol=1e-4)
        elif family.objective == "v":
            s = sigma.view(-1, *[1] * (x0.ndim - 1))
            alpha, sig = 1 / (s ** 2 + 1).sqrt(), s / (s ** 2 + 1).sqrt()
            assert torch.allclose(target, alpha * noise - sig * x0, atol=1e-4)
        assert objective.loss_at(denoiser, x0, [c for c in dataset(family)[1]], t, noise).shape == (2,)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _random_lora(pack, module, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA with random up and down (a fresh one has up = 0, which hides the down gradients)."""
    spec = pack.adapters.AdapterSpec(rank=8, alpha=8.0)
    adapter_set = pack.adapter_set.AdapterSet.create(module, spec, pack.targets.TargetSpec(preset="all"),
                                                     torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    state = adapter_set.to_state_dict()
    return {k: v if k.endswith(".alpha") else torch.randn(v.shape, generator=g) * 0.05 for k, v in state.items()}


def _sgd_gradient(pack, family, patcher, start: dict, name: str, steps: int, **widgets) -> dict:
    """The node's gradient: one SGD step (momentum 0.9 starts from the gradient itself) at learning
    rate 1 from `start` (resumed as existing_lora) moves each tensor by minus its gradient."""
    lora, _, _ = train(pack, patcher, family, steps=steps, optimizer="SGD", learning_rate=1.0, max_grad_norm=0.0,
                       weight_decay=0.0, lora_dtype="fp32", training_dtype="none", validation_every_steps=0,
                       existing_lora=name, **widgets)
    return {k: start[k].double() - lora[k].double() for k in start if not k.endswith(".alpha")}


def _first_step_draws(pack, family, denoiser, dtype):
    latents, positive = dataset(family)
    samples = [x["samples"][0] for x in latents]
    plan = pack.plan.BatchPlan([s.shape for s in samples], [1.0] * len(samples), 1, 0)
    batch = next(plan.micro_batches(start=0))
    objective = pack.objectives.Objective(pack.objectives.ObjectiveConfig())
    x0 = denoiser.prepare_latents(torch.stack([samples[i] for i in batch.indices]).to(dtype))
    t, noise = pack.loop._draws(objective, batch, x0, 0)
    return objective, x0, [positive[i] for i in batch.indices], t, noise.to(dtype)


def _finite_difference(pack, family, w64, start, directions, dtype, h=0.1) -> list[float]:
    """d/dh L(start + h * direction) at h = 0 by central differences at h and h/2, combined
    (Richardson) so the error is O(h^4). The model runs in float64, but ComfyUI hands its output
    back as float32, so the loss carries float32 rounding: steps this size keep that below 1e-4."""
    patcher = fm.build_patcher(family, w64, dtype=dtype)
    values = []
    with pack.glue.training_session(patcher, offloading=False) as denoiser, torch.no_grad():
        objective, x0, conds, t, noise = _first_step_draws(pack, family, denoiser, dtype)

        def loss(step: float, direction) -> float:
            state = {k: (v.double() + step * direction[k]) if k in direction else v for k, v in start.items()}
            adapters = pack.adapter_set.AdapterSet.from_state_dict(state, denoiser.module).to(dtype)
            with pack.attach.attach_bypass(denoiser.module, adapters):
                return objective.loss_at(denoiser, x0, conds, t, noise).double().sum().item()

        for direction in directions:
            wide = (loss(h, direction) - loss(-h, direction)) / (2 * h)
            narrow = (loss(h / 2, direction) - loss(-h / 2, direction)) / h
            values.append((4 * narrow - wide) / 3)
    return values


# Finite differences in float64 (the model's output comes back as float32, and some families run
# RoPE in float32) agree with the gradient to about 1e-3; Cosmos's fused RoPE kernel has no float64
# version, so its check runs in float32. Every checkpointing mode must equal the unchecked run to
# float rounding, a far tighter test of what checkpointing could get wrong.
FD_RTOL = {torch.float64: 1e-2, torch.float32: 5e-2}


@pytest.mark.parametrize("family", families())
def test_gradients_match_finite_differences_in_every_checkpointing_mode(pack, family):
    dtype = family.gradient_dtype
    w64 = {k: v.to(dtype) for k, v in weights(family).items()}
    probe = fm.build_patcher(family, w64, dtype=dtype)
    start = _random_lora(pack, probe.model.diffusion_model, seed=11)
    name = f"grad_start_{family.name}.safetensors"
    pack.files.save_lora(pack.loras / name, start, {})
    folder_paths.filename_list_cache.pop("loras", None)

    grads = {mode: _sgd_gradient(pack, family, fm.build_patcher(family, w64, dtype=dtype), start, name, 1,
                                 **widgets) for mode, widgets in GRADIENT_MODES.items()}
    g = torch.Generator().manual_seed(3)
    # Random directions on the scale of the LoRA's own values (0.05), so h = 0.1 moves it by 10%.
    directions = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.05 for k, v in grads["off"].items()}
                  for _ in range(2)]
    reference = _finite_difference(pack, family, w64, start, directions, dtype)
    scale = max(abs(r) for r in reference)
    assert scale > 0, "zero gradient: the check would prove nothing"
    for mode, grad in grads.items():
        analytic = [sum((grad[k] * d[k]).sum().item() for k in d) for d in directions]
        print(f"\n[family] {family.name} gradient {mode}: analytic {analytic} finite differences {reference}")
        for a, r in zip(analytic, reference):
            assert a == pytest.approx(r, rel=FD_RTOL[dtype], abs=FD_RTOL[dtype] * scale), \
                f"{family.name} {mode}: {analytic} vs {reference}"
        worst = max((grad[k] - grads["off"][k]).abs().max().item() for k in grad)
        largest = max(v.abs().max().item() for v in grads["off"].values())
        assert worst <= 1e-5 * largest, f"{family.name} {mode}: differs from unchecked by {worst:.3e} (max {largest:.3e})"

    # A second step: `auto` keeps some blocks' activations after its measuring step.
    two = {mode: _sgd_gradient(pack, family, fm.build_patcher(family, w64, dtype=dtype), start, name, 2,
                               **GRADIENT_MODES[mode]) for mode in ("off", "auto")}
    worst = max((two["auto"][k] - two["off"][k]).abs().max().item() for k in two["off"])
    largest = max(v.abs().max().item() for v in two["off"].values())
    assert worst <= 1e-5 * largest, f"{family.name} auto step 2 differs from unchecked by {worst:.3e}"


# ---------------------------------------------------------------------------------------------
# Blocks, presets
# ---------------------------------------------------------------------------------------------

# Layers no preset may pick: embedders, final layers, modulation / adaLN, norms.
NOT_IN_PRESETS = re.compile(
    r"embed|img_in$|txt_in|time_in|vector_in|guidance_in|vision_in|patchify_proj|caption_projection|"
    r"cond_seq_linear|init_x_linear|distilled_guidance|final_layer|final_linear|^head\.|^out\.|^proj_out$|"
    r"^norm_out|^out_layer\.|modulation|adaln|adaLN|_mod\.|mod[A-Z]|emb_layers|norm|^input_blocks\.0\.0$"
)


@pytest.mark.parametrize("family", families())
def test_blocks_and_presets(pack, family):
    module = fm.build_patcher(family, weights(family)).model.diffusion_model
    blocks = pack.checkpointing.find_checkpoint_blocks(module)
    assert len(blocks) > 0
    found = {}
    for preset in ("attention", "attention_mlp", "all"):
        found[preset] = set(pack.targets.find_targets(module, pack.targets.TargetSpec(preset=preset)))
        assert found[preset], f"{family.name}: preset {preset} adapts nothing"
        wrong = sorted(n for n in found[preset] if NOT_IN_PRESETS.search(n))
        assert not wrong, f"{family.name}: preset {preset} adapts {wrong}"
    assert found["attention"] <= found["attention_mlp"] <= found["all"]
    print(f"\n[family] {family.name}: {len(blocks)} blocks; attention {len(found['attention'])}, "
          f"attention_mlp {len(found['attention_mlp'])}, all {len(found['all'])} layers")


# ---------------------------------------------------------------------------------------------
# Core loader, resume
# ---------------------------------------------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("family", families())
def test_core_loader_applies_every_key_and_matches_bypass(pack, family):
    base = fm.build_patcher(family, weights(family))
    lora, _, steps = train(pack, base, family, steps=10, validation_every_steps=0)
    path = pack.lora_nodes.write_lora(lora, f"matrix/{family.name}", steps)
    file_tensors = comfy.utils.load_torch_file(str(path))

    lines = _Lines()
    logging.getLogger().addHandler(lines)
    try:
        merged = comfy.sd.load_lora_for_models(base, None, file_tensors, 1.0, 0)[0]
    finally:
        logging.getLogger().removeHandler(lines)
    unloaded = [line for line in lines.lines if "lora key not loaded" in line]
    assert not unloaded, f"{family.name}: {unloaded[:5]}"
    patched = merged.patches
    assert len(patched) == len([k for k in file_tensors if k.endswith(".alpha")]), \
        f"{family.name}: {len(patched)} weights patched"

    bypassed = pack.lora_nodes.LoadLoRAModel.execute(base, strength=1.0, bypass=True, lora=lora).args[0]
    x = torch.stack([x["samples"][0] for x in dataset(family)[0]])
    sigma = torch.tensor([0.7, 0.3]) if family.objective != "eps" and family.objective != "v" else torch.tensor([5.0, 1.0])
    conds = dataset(family)[1]
    outputs = {}
    for label, model in (("base", base), ("core", merged), ("ours", bypassed)):
        with pack.glue.training_session(model, offloading=False) as denoiser, torch.no_grad():
            outputs[label] = denoiser.denoise(denoiser.add_noise(x, torch.zeros_like(x), sigma), sigma, conds)
    change = (outputs["core"] - outputs["base"]).abs().max().item()
    assert change > 0, f"{family.name}: the LoRA changes nothing"
    difference = (outputs["core"] - outputs["ours"]).abs().max().item()
    assert difference <= 1e-3 * max(change, outputs["base"].abs().max().item()), \
        f"{family.name}: core merged vs our bypass differ by {difference:.3e} (LoRA effect {change:.3e})"


@pytest.mark.parametrize("family", families())
def test_resume_continues(pack, family):
    runs = dict(validation_every_steps=5, training_dtype="fp32", lora_dtype="fp32")
    _, whole, _ = train(pack, fm.build_patcher(family, weights(family)), family, steps=10, **runs)
    first_lora, first, steps = train(pack, fm.build_patcher(family, weights(family)), family, steps=5, **runs)
    path = pack.lora_nodes.write_lora(first_lora, f"resume/{family.name}", steps)
    name = path.relative_to(pack.loras).as_posix()
    _, second, total = train(pack, fm.build_patcher(family, weights(family)), family, steps=5, existing_lora=name,
                             **runs)
    assert total == 10 and second["steps"][0] == 6
    # N steps then M more equals N + M in one go (same seed: same samples, noise and timesteps).
    assert second["val_loss"][-1] == pytest.approx(whole["val_loss"][-1], rel=1e-3)
    assert second["val_loss"][0] == pytest.approx(first["val_loss"][-1], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# A family the pack cannot train
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class, unet_config, latent", [
    ("StableAudio", {"audio_model": "dit1.0"}, (1, 64, 215)),
    ("SAM3", {}, (1, 4, 8, 8)),
])
def test_unsupported_family_is_named_before_anything_loads(pack, config_class, unet_config, latent):
    """The model stands in for what a loader hands the node: its config is ComfyUI's own, but it
    has no diffusion model at all, so the node can only pass if it refuses before touching one."""
    import types
    import comfy.model_base
    import comfy.supported_models
    config = getattr(comfy.supported_models, config_class)(unet_config)
    model = types.SimpleNamespace(model=types.SimpleNamespace(
        model_config=config, model_type=comfy.model_base.ModelType.V_PREDICTION_CONTINUOUS))
    error_type = sys.modules[f"{PACK}.lora_core.errors"].UserInputError
    with pytest.raises(error_type, match=rf"ComfyUI's {config_class} family, .*Families it trains: Flux"):
        pack.nodes.TrainLoRA.execute(model=[model], latents=[{"samples": torch.zeros(latent)}],
                                     positive=[[[torch.zeros(1, 8, 768), {}]]], steps=[1])


# ---------------------------------------------------------------------------------------------
# Wan 2.2 14B: one expert, its noise levels only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert, low, high", [("high_noise", 0.875, 1.0), ("low_noise", 0.0, 0.875)])
def test_wan22_14b_expert_trains_only_at_its_noise_levels(pack, expert, low, high):
    """Wan 2.2 14B is two Wan 2.1-shaped experts (ComfyUI loads each as WAN21_T2V) that split the
    noise levels at sigma 0.875 (T2V; 0.9 for I2V), musubi-tuner's timestep boundary. A LoRA for
    one expert trains with min/max_noise_level set to its range: every sigma the model sees lies
    inside it, and the loss there falls."""
    family = fm.BY_NAME["wan21_t2v"]
    patcher = fm.build_patcher(family, weights(family))
    seen = []
    apply_model = patcher.model.apply_model

    def record_sigma(x, t, *args, **kwargs):  # on this test's own model object only
        seen.append(t.detach().flatten().clone())
        return apply_model(x, t, *args, **kwargs)

    patcher.model.apply_model = record_sigma
    _, loss_map, _ = train(pack, patcher, family, training_dtype="fp32", min_noise_level=low, max_noise_level=high)
    sigmas = torch.cat(seen)
    assert sigmas.min().item() >= low - 1e-4 and sigmas.max().item() <= high + 1e-4, (sigmas.min(), sigmas.max())
    assert sigmas.max().item() - sigmas.min().item() > 0.5 * (high - low)  # the whole range is used
    assert_loss_falls(loss_map, f"wan22_14b {expert}")
