"""The families whose ComfyUI code writes into tensors autograd saved, or calls a fused kernel with
no autograd formula, train with exact gradients (issue 12, deliverable 0).

For each of Flux.1 (dev, schnell), Chroma, Flux.2, HunyuanVideo 1.0 and 1.5, LTX-Video and Cosmos
Predict2, on a tiny random-weight model built with ComfyUI's own classes (`family_models`):
- plain autograd fails on it (the model really needs the fix: "modified by an inplace operation",
  or no autograd formula for Cosmos's comfy_kitchen rope);
- float64: the adapter gradients of one loss through the pack's `ComfyDenoiser`, computed under
  `AutogradSafety` as the training loop does, match central finite differences, and checkpointing
  all blocks and `auto` (after its measuring pass) give the unchecked gradients to float rounding;
  also with augmented assignments left in place (copy-on-write alone must be right too);
- fp32, through the training loop itself (`training_session` + `train`, SGD at learning rate 1
  from a known random LoRA, so the first update is the gradient): checkpointing off, auto and
  all_blocks end at the same weights;
- Cosmos: inside a session the eager twin of the fused kernel gives the kernel's output;
- nothing of the mechanism is left afterwards (Tensor's dunders, modes, saved-tensor hooks).

Runs in-process in ComfyUI's venv:
    COMFYUI_ROOT=/opt/comfy /opt/comfy/venv/bin/python -m pytest tests/integration/test_inplace_families.py -q
Skipped without COMFYUI_ROOT.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
if not COMFYUI_ROOT:
    pytest.skip("COMFYUI_ROOT is not set: these checks run inside ComfyUI's Python "
                "(COMFYUI_ROOT=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python -m pytest ...)",
                allow_module_level=True)
sys.path.insert(0, COMFYUI_ROOT)
try:
    import comfy.cli_args
except ImportError as error:
    pytest.skip(f"ComfyUI does not import in this Python ({error}): run with ComfyUI's venv python",
                allow_module_level=True)
comfy.cli_args.args.cpu = True  # before model_management is imported

import torch  # noqa: E402

import family_models as fm  # noqa: E402

PACK = "lora_trainer_inplace_pack"

# HunyuanVideo 1.0 (text to video): guidance-distilled, a pooled CLIP-L vector, 1x2x2 patches.
HUNYUAN_VIDEO = fm.Family("hunyuan_video", "HunyuanVideo", dict(
    image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
    hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
    patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
    use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False),
    (16, 3, 8, 8), (8, 4096), "flow", lambda g: {"pooled_output": fm._randn(g, 1, 768), "guidance": 6.0},
    shift=7.0, needs_inplace_fix=True)

FAMILIES = {f.name: f for f in (
    fm.BY_NAME["flux1_dev"], fm.BY_NAME["flux1_schnell"], fm.BY_NAME["chroma"], fm.BY_NAME["flux2"], HUNYUAN_VIDEO,
    fm.BY_NAME["hunyuan_video15"], fm.BY_NAME["ltxv"], fm.BY_NAME["cosmos_predict2"])}


@pytest.fixture(scope="module")
def pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def imports(pack):
    glue = importlib.import_module(f"{PACK}.nodes.comfy_glue")
    safety = importlib.import_module(f"{PACK}.lora_core.memory.autograd_safety")
    checkpointing = importlib.import_module(f"{PACK}.lora_core.memory.checkpointing")
    adapters = importlib.import_module(f"{PACK}.lora_core.adapters")
    adapter_set = importlib.import_module(f"{PACK}.lora_core.adapters.adapter_set")
    targets = importlib.import_module(f"{PACK}.lora_core.adapters.targets")
    attach = importlib.import_module(f"{PACK}.lora_core.adapters.attach")
    loop = importlib.import_module(f"{PACK}.lora_core.training.loop")
    return glue, safety, checkpointing, adapters, adapter_set, targets, attach, loop


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    family = FAMILIES[request.param]
    return family, fm.build_state_dict(family)


def random_adapters(pack, module, dtype, seed=0):
    """Every Linear of the `all` preset adapted, every factor random (a fresh LoRA's zero `up`
    would make the `down` gradients zero and hide errors in them)."""
    _, _, _, adapters, adapter_set, targets, _, _ = imports(pack)
    aset = adapter_set.AdapterSet.create(module, adapters.AdapterSpec(rank=2, alpha=2.0),
                                         targets.TargetSpec(preset="all"), torch.Generator().manual_seed(seed),
                                         dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)
    return aset


def batch(family):
    return [fm.conditioning(family, 1), fm.conditioning(family, 2)], torch.stack(fm.latents(family, 2))


def assert_nothing_left(safety):
    assert torch.Tensor.__iadd__ is torch._C.TensorBase.__iadd__
    assert not safety.augmented_patch_installed()
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_plain_autograd_cannot_train_it(pack, family):
    family, weights = family
    glue, safety, _, _, _, _, attach, _ = imports(pack)
    conds, latents = batch(family)
    with torch.inference_mode(False), glue.training_session(fm.build_patcher(family, weights), offloading=False) as d:
        aset = random_adapters(pack, d.module, torch.float32)
        with attach.attach_bypass(d.module, aset):
            sigma = d.sigma_at(torch.tensor([0.3, 0.7]))
            x0 = d.prepare_latents(latents)
            x_t = d.add_noise(x0, torch.randn_like(x0), sigma)
            with pytest.raises(RuntimeError, match="inplace operation|[Aa]utograd"):
                (d.denoise(x_t, sigma, conds) - x0).pow(2).mean().backward()
    assert_nothing_left(safety)


@pytest.mark.parametrize("out_of_place_augmented", [True, False], ids=["out_of_place", "copy_on_write_only"])
def test_gradients_match_finite_differences_in_every_checkpointing_mode(pack, family, out_of_place_augmented):
    family, weights = family
    glue, safety, checkpointing, _, _, _, attach, _ = imports(pack)
    dtype = torch.float64
    conds, latents = batch(family)
    with torch.inference_mode(False), glue.training_session(fm.build_patcher(family, weights, dtype),
                                                            offloading=False) as d:
        aset = random_adapters(pack, d.module, dtype)
        params = list(aset.parameters())
        x0 = d.prepare_latents(latents.to(dtype))
        sigma = d.sigma_at(torch.tensor([0.3, 0.7])).to(dtype)
        x_t = d.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=dtype), sigma)

        def loss():
            return (d.denoise(x_t, sigma, conds).double() - x0).pow(2).mean()

        def gradient(blocks, passes=1):
            with blocks if blocks is not None else contextlib.nullcontext():
                for _ in range(passes):  # `auto` measures on its first pass, keeps activations after
                    for p in params:
                        p.grad = None
                    with safety.AutogradSafety(d.autograd_reference_ops, out_of_place_augmented):
                        loss().backward()
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

        with attach.attach_bypass(d.module, aset):
            unchecked = gradient(None)
            every = checkpointing.GradientCheckpointing(d.module)
            all_blocks = gradient(every)
            assert len(every.blocks) > 0
            # Half the measured activations may stay: some blocks keep theirs, the others recompute.
            auto = checkpointing.GradientCheckpointing(
                d.module, keep_budget=lambda: sum(c.saved_bytes for c in auto.costs.values()) // 2)
            selective = gradient(auto, passes=2)
            assert auto.recomputed is not None

            # Along the gradient plus a random direction: the derivative is never a tiny
            # difference of large numbers, and every parameter is moved.
            noise = torch.randn(unchecked.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
            direction = unchecked / unchecked.norm() + noise / noise.norm()
            eps = 1e-4

            def moved(step):
                with torch.no_grad(), safety.AutogradSafety(d.autograd_reference_ops):
                    start = 0
                    for p in params:
                        p.add_(step * direction[start:start + p.numel()].view_as(p))
                        start += p.numel()
                    value = loss().item()
                    start = 0
                    for p in params:
                        p.sub_(step * direction[start:start + p.numel()].view_as(p))
                        start += p.numel()
                return value

            finite = (moved(eps) - moved(-eps)) / (2 * eps)
    analytic = (unchecked * direction).sum().item()
    assert unchecked.abs().max() > 0
    assert abs(analytic - finite) <= 1e-3 * abs(finite), (analytic, finite)
    scale = unchecked.abs().max()
    assert (all_blocks - unchecked).abs().max() <= 1e-9 * scale
    assert (selective - unchecked).abs().max() <= 1e-9 * scale
    assert_nothing_left(safety)


def test_training_loop_checkpointing_modes_reach_the_same_weights(pack, family):
    family, weights = family
    glue, safety, _, adapters, adapter_set, targets, _, loop = imports(pack)
    conds, latents = batch(family)
    data = loop.TrainingData(list(latents), conds)
    results = {}
    for mode, settings in {"off": dict(gradient_checkpointing=False),
                           "auto": dict(gradient_checkpointing=True, checkpoint_policy="auto"),
                           "all_blocks": dict(gradient_checkpointing=True, checkpoint_policy="all_blocks")}.items():
        config = loop.TrainConfig(steps=2, batch_size=2, learning_rate=1.0, optimizer="sgd", training_dtype="fp32",
                                  bypass=True, adapter=adapters.AdapterSpec(rank=2, alpha=2.0),
                                  targets=targets.TargetSpec(preset="all"), **settings)
        with torch.inference_mode(False), glue.training_session(fm.build_patcher(family, weights),
                                                                offloading=False) as d:
            start = random_adapters(pack, d.module, torch.float32)
            before = {k: v.clone() for k, v in start.to_state_dict().items()}
            result = loop.train(d, data, config, resume=loop.ResumePoint(start, 0))
            results[mode] = result.adapter_set.to_state_dict()
        assert all(map(lambda v: v == v, result.loss))  # finite
    assert any((results["off"][k] - before[k]).abs().max() > 1e-4 for k in before)
    for mode in ("auto", "all_blocks"):
        for key, value in results["off"].items():
            torch.testing.assert_close(results[mode][key], value, rtol=1e-5, atol=1e-6, msg=f"{mode} {key}")
    assert_nothing_left(safety)


def test_cosmos_eager_twin_gives_the_kernels_output(pack):
    family = FAMILIES["cosmos_predict2"]
    glue, safety, _, _, _, _, _, _ = imports(pack)
    references = glue.kitchen_reference_ops()
    assert torch.ops.comfy_kitchen.rms_rope_split_half in references
    conds, latents = batch(family)
    with torch.inference_mode(False), glue.training_session(fm.build_patcher(family, fm.build_state_dict(family)),
                                                            offloading=False) as d, torch.no_grad():
        sigma = d.sigma_at(torch.tensor([0.3, 0.7]))
        x0 = d.prepare_latents(latents)
        x_t = d.add_noise(x0, torch.randn_like(x0), sigma)
        kernel = d.denoise(x_t, sigma, conds)
        with safety.AutogradSafety(references) as session:
            twin = d.denoise(x_t, sigma, conds)
    assert session.rerouted > 0
    torch.testing.assert_close(twin, kernel, rtol=1e-5, atol=1e-5)
