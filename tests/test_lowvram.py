"""Quantized (float8) base models: bypass training works and leaves them untouched; merge mode, FP8
backward off-GPU and the other unsupported combinations are explained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lora_core.toy import toy_dataset
from torch import nn

from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import AdapterSet, attach_bypass
from lora_core.memory.checkpointing import GradientCheckpointing
from lora_core.errors import UserInputError
from lora_core.lorafile.files import load_lora, save_lora
from lora_core.memory.offload import BlockOffloader
from lora_core.memory.quantized import (
    FP8_BACKWARD_FALLBACK,
    check_low_vram_settings,
    describe_storage,
    fp8_backward_support,
    quantized_parameters,
    require_bypass_for_quantized,
)
from lora_core.adapters.targets import TargetSpec
from lora_core.toy import make_toy_denoiser
from lora_core.training.loop import TrainConfig, train


class Float8Linear(nn.Linear):
    """Like ComfyUI's manual_cast Linear: weight and bias stored in float8, cast in forward.
    `compute_dtype` plays the model's manual-cast dtype (None: the input's dtype)."""

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def quantize_linears(net: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> nn.Module:
    for module in net.modules():
        if type(module) is nn.Linear:
            module.__class__ = Float8Linear
            module.compute_dtype = compute_dtype
            for name, parameter in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(parameter.detach().to(dtype), requires_grad=False))
    return net


def raw_bytes(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().view(torch.uint8).clone() for name, p in net.named_parameters()}


def quantized_config(**overrides) -> TrainConfig:
    settings = dict(
        steps=40, batch_size=4, learning_rate=2e-2, training_dtype="none", bypass=True,
        adapter=AdapterSpec(rank=8, alpha=8), targets=TargetSpec(preset="all"), gradient_checkpointing=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize(
    "storage, compute",
    [(torch.float8_e4m3fn, None), (torch.float8_e4m3fn, torch.bfloat16), (torch.float8_e5m2, None)],
    ids=["e4m3-fp32", "e4m3-bf16", "e5m2-fp32"],
)
def test_float8_model_trains_in_bypass_mode_and_stays_untouched(tmp_path, storage, compute):
    denoiser, data = make_toy_denoiser("flow"), toy_dataset()
    quantize_linears(denoiser.module, storage, compute)
    assert set(quantized_parameters(denoiser.module).values()) == {str(storage).removeprefix("torch.")}
    before = raw_bytes(denoiser.module)

    result = train(denoiser, data, quantized_config())

    assert sum(result.loss[-8:]) < 0.7 * sum(result.loss[:8]), result.loss
    after = raw_bytes(denoiser.module)
    assert all(torch.equal(before[name], after[name]) for name in before), "float8 weights must stay bit for bit"
    assert all(p.dtype == storage for m in denoiser.module.modules() if isinstance(m, Float8Linear) for p in m.parameters())

    # The saved file, loaded back and attached in bypass mode, gives what training produced.
    x = torch.stack(data.latents)
    sigma = torch.full((len(data),), 0.5)
    with torch.no_grad(), attach_bypass(denoiser.module, result.adapter_set):
        trained = denoiser.denoise(x, sigma, list(data.conds))
    path = save_lora(tmp_path / "fp8.safetensors", result.adapter_set.to_state_dict())
    tensors, _ = load_lora(path)
    reloaded = AdapterSet.from_state_dict(tensors, denoiser.module)
    with torch.no_grad(), attach_bypass(denoiser.module, reloaded):
        assert torch.equal(denoiser.denoise(x, sigma, list(data.conds)), trained)
    with torch.no_grad():
        assert not torch.equal(denoiser.denoise(x, sigma, list(data.conds)), trained), "the LoRA changes the output"


def test_offloading_a_float8_model_gives_the_same_gradients():
    net = quantize_linears(make_toy_denoiser("eps").module, torch.float8_e4m3fn)
    adapters = AdapterSet.create(net, AdapterSpec(rank=4, alpha=4), TargetSpec(preset="all"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.add_(0.1)
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.rand(2, generator=generator), torch.randn(2, 4, 8, generator=generator))
    before = raw_bytes(net)
    grads = []
    for offload in (False, True):
        adapters.zero_grad(set_to_none=True)
        with attach_bypass(net, adapters), GradientCheckpointing(net):
            if offload:
                with BlockOffloader(net, "cpu") as offloader:
                    assert offloader.streamed_bytes() > 0
                    net(*inputs).square().mean().backward()
            else:
                net(*inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in adapters.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    after = raw_bytes(net)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_merge_mode_on_a_float8_model_is_refused():
    net = quantize_linears(make_toy_denoiser("eps").module, torch.float8_e4m3fn)
    require_bypass_for_quantized(net, bypass=True)
    with pytest.raises(UserInputError, match="quantized model needs bypass_mode") as error:
        require_bypass_for_quantized(net, bypass=False)
    assert "float8_e4m3fn" in str(error.value)
    require_bypass_for_quantized(make_toy_denoiser("eps").module, bypass=False)  # plain float: fine


class PackedTensor(torch.Tensor):
    """Stands in for ComfyUI's QuantizedTensor / GGUF tensors: a tensor subclass holding the data."""


def test_tensor_subclasses_and_integer_storage_count_as_quantized():
    packed = nn.Linear(4, 4)
    packed.weight = nn.Parameter(torch.Tensor._make_subclass(PackedTensor, torch.zeros(4, 4)), requires_grad=False)
    assert describe_storage(packed.weight) == "PackedTensor"
    assert describe_storage(torch.zeros(3, dtype=torch.uint8)) == "uint8"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert describe_storage(nn.Parameter(torch.zeros(2, dtype=dtype))) is None

    class LazyParameter(nn.Parameter):  # a Parameter subclass over plain storage (ComfyUI's lazy casting)
        pass

    assert describe_storage(LazyParameter(torch.zeros(2))) is None
    with pytest.raises(UserInputError, match="PackedTensor"):
        require_bypass_for_quantized(packed, bypass=False)


def test_fp8_backward_falls_back_with_a_clear_warning_off_gpu():
    enabled, message = fp8_backward_support("cpu")
    assert not enabled
    assert message.startswith(FP8_BACKWARD_FALLBACK)
    assert "quantized_backward needs an FP8-capable CUDA GPU; using dequantized backward" in message


def low_vram(model, **overrides):
    settings = dict(device="cpu", bypass=True, training_dtype="none", gradient_checkpointing=True,
                    offloading=False, quantized_backward=False)
    settings.update(overrides)
    return check_low_vram_settings(model, **settings)


def test_unsupported_combinations_are_errors_and_odd_ones_warnings():
    plain = make_toy_denoiser("eps").module
    fp8 = quantize_linears(make_toy_denoiser("eps").module, torch.float8_e4m3fn)
    packed = nn.Linear(4, 4)
    packed.weight = nn.Parameter(torch.Tensor._make_subclass(PackedTensor, torch.zeros(4, 4)), requires_grad=False)

    with pytest.raises(UserInputError, match="offloading needs gradient_checkpointing on"):
        low_vram(plain, offloading=True, gradient_checkpointing=False)
    with pytest.raises(UserInputError, match="quantized model needs bypass_mode"):
        low_vram(fp8, bypass=False)

    assert low_vram(fp8).warnings == []
    assert low_vram(plain, bypass=False, offloading=True).warnings == []
    assert "training_dtype none" in low_vram(fp8, training_dtype="bf16").warnings[0]
    assert "no quantized weights" in low_vram(plain, quantized_backward=True).warnings[0]
    assert "plain float8" in low_vram(fp8, quantized_backward=True).warnings[0]
    check = low_vram(packed, quantized_backward=True)
    assert not check.fp8_backward
    assert check.warnings[0].startswith(FP8_BACKWARD_FALLBACK)


COMFY_CAST_CHECK = r"""
import json, sys
comfy_root, pack_root = sys.argv[1], sys.argv[2]
sys.path[:0] = [comfy_root, pack_root]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import AdapterSet, attach_bypass
from lora_core.memory.checkpointing import GradientCheckpointing
from lora_core.memory.offload import BlockOffloader
from lora_core.memory.quantized import quantized_parameters
from lora_core.adapters.targets import TargetSpec

torch.set_num_threads(1)
results = {}
for storage in ("float16", "float8_e4m3fn"):
    model = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
                      channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                      transformer_depth_output=[1, 1, 1, 1], context_dim=16, num_heads=2,
                      use_spatial_transformer=True, legacy=False, dtype=getattr(torch, storage),
                      device="cpu", operations=comfy.ops.manual_cast)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(((torch.rand(p.shape, generator=generator) - 0.5) * 0.2).to(p.dtype))
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.endswith("to_k"):  # what ComfyUI's lowvram LoRA patches look like: applied on every cast
            module.weight_function = [lambda w: w * 1.01]
    adapters = AdapterSet.create(model, AdapterSpec(rank=4, alpha=4), TargetSpec(preset="attention_mlp"),
                                 torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.05)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 5, 16, generator=generator)
    before = {k: v.view(torch.uint8).clone() for k, v in model.state_dict().items()}
    grads, streamed = [], 0
    for offload in (False, True):
        adapters.zero_grad(set_to_none=True)
        with attach_bypass(model, adapters), GradientCheckpointing(model):
            if offload:
                with BlockOffloader(model, "cpu") as offloader:
                    streamed = offloader.streamed_bytes()
                    model(x, timesteps=torch.tensor([500]), context=context).float().square().mean().backward()
            else:
                model(x, timesteps=torch.tensor([500]), context=context).float().square().mean().backward()
        grads.append([p.grad.clone() for p in adapters.parameters()])
    results[storage] = dict(
        equal=all(torch.equal(a, b) for a, b in zip(*grads)),
        nonzero=all(bool(g.abs().sum() > 0) for g in grads[0]),
        streamed=streamed,
        restored=all(torch.equal(before[k], v.view(torch.uint8)) for k, v in model.state_dict().items()),
        quantized=len(quantized_parameters(model)),
    )
print("RESULTS " + json.dumps(results))
"""


def test_comfyui_cast_layers_and_lowvram_patches_work_with_offloading(tmp_path):
    """ComfyUI's manual_cast layers (fp16 and float8 storage, a lowvram-style weight_function on
    some) under block checkpointing + offloading + bypass LoRA: gradients unchanged, weights
    untouched. Runs in a ComfyUI child process; skipped without COMFYUI_ROOT."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "comfy" / "ops.py").exists():
        pytest.skip("COMFYUI_ROOT is not set: this check needs a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(root) / "venv" / "bin" / "python")
    python = python if Path(python).exists() else sys.executable
    script = tmp_path / "check.py"
    script.write_text(COMFY_CAST_CHECK)
    done = subprocess.run([python, str(script), root, str(Path(__file__).resolve().parents[1])],
                          capture_output=True, text=True, timeout=600, cwd=root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    for storage, result in results.items():
        assert result["equal"] and result["nonzero"] and result["restored"], (storage, result)
        assert result["streamed"] > 0, storage
    assert results["float16"]["quantized"] == 0 and results["float8_e4m3fn"]["quantized"] > 0


def test_the_engine_refuses_merge_mode_on_a_float8_model():
    denoiser = make_toy_denoiser("flow")
    quantize_linears(denoiser.module, torch.float8_e4m3fn)
    with pytest.raises(UserInputError, match="quantized model needs bypass_mode"):
        train(denoiser, toy_dataset(), quantized_config(bypass=False, steps=1))
