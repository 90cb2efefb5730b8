"""Our files in the real LyCORIS and diffusers, and their files in ours (issue 17).

A tiny diffusers `UNet2DConditionModel` (SD1.x block layout, built here, nothing downloaded) is
the model: its module names are the diffusers block names kohya-ss gives SD1.x, so our kohya
export of a LoRA trained on it is named as sd-scripts names SD1.x LoRAs. Every Linear/Conv layer
gets an adapter (83 modules, LoCon included). For each algorithm we check that the libraries
consume every module of our file and compute the deltas we compute, and that the files their
own save paths write load in ours with their deltas and continue training.

Bugs of LyCORIS 4.1.3 these tests name and check around, with tolerances unchanged:
- LoHa / LoKr `get_diff_weight` multiply by alpha / rank twice (`get_weight` already applies
  it): we compare `get_weight` and assert get_diff_weight == get_weight * scale.
- `LycorisNetworkKohya` (the kohya-ss network, also built by `create_network_from_weights`)
  asserts "duplicated lora name: lora_unet_time_embedding_linear_1" on a diffusers SD UNet: its
  target names list `time_embedding.linear_1/2`, which its `TimestepEmbedding` target class
  covers already. We drop the duplicate names for the test; those layers still load through the
  class.
"""

from __future__ import annotations

import logging

import pytest
import torch

lycoris = pytest.importorskip("lycoris", reason="test-only dependency lycoris-lora (installed by .ci/run)")
pytest.importorskip("diffusers", reason="test-only dependency diffusers (installed by .ci/run)")
pytest.importorskip("peft", reason="test-only dependency peft (diffusers' LoRA backend, installed by .ci/run)")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin  # noqa: E402
from lycoris import create_lycoris  # noqa: E402
from lycoris import kohya as lycoris_kohya  # noqa: E402
from lycoris.functional import diag_oft, locon, loha, lokr  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from lora_core.adapters import AdapterSpec, OFT  # noqa: E402
from lora_core.adapters.adapter_set import AdapterSet, split_key  # noqa: E402
from lora_core.adapters.targets import TargetSpec  # noqa: E402
from lora_core.lorafile.files import load_lora, lora_metadata, save_kohya_lora, save_lora  # noqa: E402
from lora_core.lorafile.keys import adapter_set_from_tensors  # noqa: E402
from lora_core.lorafile.resume import resume_point  # noqa: E402
from lora_core.toy import ToyDenoiser, make_caption_embeddings  # noqa: E402
from lora_core.training.loop import TrainConfig, TrainingData, train  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
RANK, ALPHA = 4, 2.0  # alpha != rank, so every scale convention shows
ALGORITHMS = ["lora", "loha", "lokr", "oft"]
LYCORIS_ALGO = {"lora": "lora", "loha": "loha", "lokr": "lokr", "oft": "diag-oft"}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    return model.eval().requires_grad_(False)


def trained(unet, algorithm: str, alpha: float = ALPHA, seed: int = 0) -> AdapterSet:
    """Our adapters on every Linear/Conv layer, moved off their identity start."""
    spec = AdapterSpec(algorithm=algorithm, rank=RANK, alpha=alpha if algorithm != "oft" else 0.0, oft_block_size=8)
    # every Linear/Conv layer, embedders too (the "all" preset leaves those to include patterns)
    targets = TargetSpec(preset="all", include=["."])
    adapter_set = AdapterSet.create(unet, spec, targets, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in adapter_set.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapter_set


def weight_of(unet, name: str) -> torch.Tensor:
    return unet.get_submodule(name).weight.detach()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, where: str) -> None:
    # float32 rounding of the same products in another order
    torch.testing.assert_close(theirs.float(), ours.float(), rtol=2e-5, atol=1e-6, msg=where)


def kohya_file(tmp_path, adapter_set: AdapterSet, algorithm: str, alpha: float = ALPHA):
    metadata = lora_metadata(algorithm, RANK, alpha, "all", 10)
    return save_kohya_lora(tmp_path / f"{algorithm}_kohya.safetensors", adapter_set.to_state_dict(), metadata)


# ---- our files, read by LyCORIS --------------------------------------------------------------------
def functional_delta(suffixes: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW from LyCORIS's functional API, fed the tensors of one module of our file."""
    alpha = float(suffixes["alpha"])
    if "lora_up.weight" in suffixes:
        down, up = suffixes["lora_down.weight"], suffixes["lora_up.weight"]
        return locon.diff_weight(down, up, None, gamma=alpha / down.shape[0]).reshape(weight.shape)
    if "hada_w1_a" in suffixes:
        w1_b = suffixes["hada_w1_b"]
        args = (w1_b, suffixes["hada_w1_a"], suffixes["hada_w2_b"], suffixes["hada_w2_a"], None, None)
        return loha.diff_weight(*args, gamma=alpha / w1_b.shape[0]).reshape(weight.shape)
    if "oft_blocks" in suffixes:
        return diag_oft.diff_weight(weight, suffixes["oft_blocks"], None, constraint=alpha).reshape(weight.shape)
    parts = [suffixes.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")]
    # functional.lokr divides gamma by the rank itself (1 for full factors: scale 1, as ComfyUI)
    factored = parts[4] is not None or parts[1] is not None
    return lokr.diff_weight(*parts, None, gamma=alpha if factored else 1.0).reshape(weight.shape)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("export", ["default", "kohya"])
def test_lycoris_functional_api_gives_our_deltas(unet, tmp_path, algorithm, export):
    adapter_set = trained(unet, algorithm)
    state = adapter_set.to_state_dict()
    if export == "default":
        path = save_lora(tmp_path / "ours.safetensors", state, lora_metadata(algorithm, RANK, ALPHA, "all", 10))
    else:
        path = kohya_file(tmp_path, adapter_set, algorithm)
    tensors, _ = load_lora(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, suffix = split_key(key.removeprefix("diffusion_model."))
        modules.setdefault(module, {})[suffix] = tensor
    assert len(modules) == len(adapter_set.adapter_items()) == 83
    for name, adapter in adapter_set.adapter_items():
        key = "lora_unet_" + name.replace(".", "_") if export == "kohya" else name
        weight = weight_of(unet, name)
        assert_close(adapter.delta_weight(weight).detach(), functional_delta(modules.pop(key), weight), name)
    assert not modules, "every module of the file is consumed"


def lycoris_kohya_network(path, unet, monkeypatch):
    # LyCORIS bug: duplicated time_embedding names on a diffusers UNet (see the module docstring).
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", ["conv_in", "conv_out"])
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, None, unet)
    return {module.lora_name: module for module in network.unet_loras}


def lycoris_delta(module, weight: torch.Tensor) -> torch.Tensor:
    """A LyCORIS module's ΔW, around its LoHa/LoKr get_diff_weight bug (scale applied twice)."""
    diff = module.get_diff_weight(1.0, weight.shape)[0].detach()
    if type(module).__name__ in ("LohaModule", "LokrModule"):
        once = module.get_weight(weight.shape).detach()
        torch.testing.assert_close(diff, once * module.scale)  # the bug, named: scale twice
        return once
    return diff


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lycoris_kohya_loader_consumes_every_module_of_our_kohya_export(unet, tmp_path, monkeypatch, algorithm):
    adapter_set = trained(unet, algorithm)
    loaded = lycoris_kohya_network(kohya_file(tmp_path, adapter_set, algorithm), unet, monkeypatch)
    assert len(loaded) == len(adapter_set.adapter_items()) == 83
    for name, adapter in adapter_set.adapter_items():
        weight = weight_of(unet, name)
        module = loaded.pop("lora_unet_" + name.replace(".", "_"))
        assert_close(adapter.delta_weight(weight).detach(), lycoris_delta(module, weight), name)
    assert not loaded


def test_lycoris_reads_a_constrained_oft_file_with_its_own_bound(unet, tmp_path, monkeypatch):
    """ComfyUI (and we) bound ||Q|| by alpha, LyCORIS by alpha * out_channels: a constrained file
    means the same in both only where neither bound binds. LyCORIS's delta is ours with the
    bound alpha * out_channels, as the README says."""
    alpha = 1e-3
    adapter_set = trained(unet, "oft")
    for _, adapter in adapter_set.adapter_items():
        adapter.alpha = alpha
    loaded = lycoris_kohya_network(kohya_file(tmp_path, adapter_set, "oft", alpha), unet, monkeypatch)
    assert len(loaded) == 83
    for name, adapter in adapter_set.adapter_items():
        weight = weight_of(unet, name)
        lycoris_meaning = OFT(adapter.oft_blocks.detach(), alpha * weight.shape[0])
        assert_close(lycoris_meaning.delta_weight(weight), lycoris_delta(loaded[f"lora_unet_{name.replace('.', '_')}"], weight), name)


# ---- our files, read by diffusers ------------------------------------------------------------------
def test_diffusers_loads_every_module_of_our_kohya_export_with_our_deltas(unet, tmp_path):
    adapter_set = trained(unet, "lora")
    tensors, _ = load_lora(kohya_file(tmp_path, adapter_set, "lora"))
    model = _copy(unet)
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(tensors)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet=model, adapter_name="ours")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    assert len(layers) == len(adapter_set.adapter_items()) == 83
    for name, adapter in adapter_set.adapter_items():
        theirs = layers[name].get_delta_weight("ours").detach()
        assert_close(adapter.delta_weight(weight_of(unet, name)).detach(), theirs, name)


def _copy(unet):
    model = UNet2DConditionModel.from_config(unet.config)
    model.load_state_dict(unet.state_dict())
    return model.eval().requires_grad_(False)


# ---- their files, read by us ------------------------------------------------------------------------
class UNetDenoiser(ToyDenoiser):
    """The diffusers UNet as an eps-prediction `Denoiser` (ToyDenoiser's sigma table)."""

    def denoise(self, x_t, sigma, conds):
        context = torch.stack(conds).to(x_t.device, torch.float32)
        scaled = x_t / (sigma**2 + 1.0).sqrt().reshape(-1, 1, 1, 1)
        eps = self.module(scaled, sigma.log() * 100.0, encoder_hidden_states=context).sample.float()
        return x_t.float() - sigma.reshape(-1, 1, 1, 1) * eps


def continue_training(unet, tensors, metadata, algorithm: str, alpha: float):
    """Two more steps from the file in our trainer; returns (loaded set, trained set)."""
    denoiser = UNetDenoiser(_copy(unet))
    config = TrainConfig(
        steps=2, batch_size=1, learning_rate=1e-2, training_dtype="fp32", gradient_checkpointing=False,
        adapter=AdapterSpec(algorithm=algorithm, rank=RANK, alpha=alpha, oft_block_size=8),
        targets=TargetSpec(preset="all", include=["."]),
    )
    point = resume_point(tensors, metadata, denoiser, config, "their file")
    before = {k: v.clone() for k, v in point.adapter_set.to_state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    data = TrainingData(latents=[torch.randn(4, 8, 8, generator=generator) for _ in range(2)],
                        conds=make_caption_embeddings(2, tokens=3, cond_dim=32))
    result = train(denoiser, data, config, resume=point)
    after = result.adapter_set.to_state_dict()
    assert result.total_steps == point.steps_done + 2 and all(torch.isfinite(torch.tensor(result.loss)))
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in before), "training moved the adapters"
    return point.adapter_set


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lycoris_saved_files_load_with_their_deltas_and_continue(unet, tmp_path, algorithm):
    model = _copy(unet)
    extra = {"constraint": 1e-3} if algorithm == "oft" else {}  # a binding LyCORIS bound: converted on reading
    network = create_lycoris(model, 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo=LYCORIS_ALGO[algorithm], **extra)
    network.apply_to()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    tensors, metadata = load_lora(path)
    modules = {m.lora_name: m for m in network.loras}
    assert modules and all(name.startswith("lycoris_") for name in modules)

    ours = adapter_set_from_tensors(tensors, metadata, unet)
    assert len(ours.adapter_items()) == len(modules)
    for name, adapter in ours.adapter_items():
        weight = weight_of(unet, name)
        theirs = lycoris_delta(modules["lycoris_" + name.replace(".", "_")], weight)
        assert_close(adapter.delta_weight(weight).detach(), theirs, name)

    alpha = 1e-3 if algorithm == "oft" else ALPHA
    continued = continue_training(unet, tensors, metadata, algorithm, alpha)
    assert len(continued.adapter_items()) == len(modules)


def test_diffusers_saved_files_load_with_their_deltas_and_continue(unet, tmp_path):
    model = _copy(unet)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(model), safe_serialization=True,
        unet_lora_adapter_metadata=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets).to_dict(),
    )
    tensors, metadata = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}

    ours = adapter_set_from_tensors(tensors, metadata, unet)
    assert len(ours.adapter_items()) == len(layers) == len(tensors) // 2
    for name, adapter in ours.adapter_items():
        theirs = layers[name].get_delta_weight("default").detach()
        assert_close(adapter.delta_weight(weight_of(unet, name)).detach(), theirs, name)
    continue_training(unet, tensors, metadata, "lora", ALPHA)
