"""LoRA files: round trip, atomic writes, clear errors, kohya export, foreign formats."""

import json
import struct

import pytest
import torch
from torch import nn

import lora_core.lorafile.files as files
from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import AdapterSet
from lora_core.errors import UserInputError
from lora_core.lorafile.files import load_lora, lora_metadata, save_kohya_lora, save_lora, to_internal, to_kohya
from lora_core.adapters.targets import TargetSpec


class Module(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def tiny_model():
    torch.manual_seed(0)
    block = Module(attn1=Module(to_q=nn.Linear(8, 8, bias=False), to_out=nn.Sequential(nn.Linear(8, 8))),
                   ff=Module(net=nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))),
                   norm1=nn.LayerNorm(8))
    return Module(proj_in=nn.Conv2d(4, 8, 3, padding=1), transformer_blocks=nn.ModuleList([block]))


def trained_set(model, algorithm="lora", seed=0):
    spec = AdapterSpec(algorithm=algorithm, rank=2, alpha=4.0, oft_block_size=4)
    adapter_set = AdapterSet.create(model, spec, TargetSpec(train_norms_and_biases=True), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for parameter in adapter_set.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return adapter_set


def deltas(adapter_set, model):
    return {name: adapter.delta_weight(model.get_submodule(name).weight).detach() for name, adapter in adapter_set.adapter_items()}


def assert_same_deltas(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "oft"])
def test_round_trip_is_bit_exact_with_metadata(tmp_path, algorithm):
    model = tiny_model()
    state = trained_set(model, algorithm).to_state_dict()
    state_bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    metadata = lora_metadata(algorithm, 2, 4.0, "attention_mlp", 120, {"learning_rate": 1e-4, "seed": 3})
    for tensors in (state, state_bf16):
        path = save_lora(tmp_path / "my_lora.safetensors", tensors, metadata)
        loaded, loaded_metadata = load_lora(path)
        assert loaded.keys() == tensors.keys()
        assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
        assert loaded_metadata == metadata
    assert metadata["ss_network_dim"] == "2" and metadata["ss_steps"] == "120"
    assert json.loads(metadata["training_settings"]) == {"learning_rate": 1e-4, "seed": 3}
    assert all(isinstance(v, str) for v in metadata.values())
    assert [p.name for p in tmp_path.iterdir()] == ["my_lora.safetensors"]


def test_non_string_metadata_values_are_stored_as_json(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", {"x.alpha": torch.tensor(1.0)}, {"steps": 5, "nested": {"a": [1]}})
    assert load_lora(path)[1] == {"steps": "5", "nested": '{"a": [1]}'}


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora(path, {"a.alpha": torch.tensor(1.0)}, {"steps": "1"})
    original = path.read_bytes()

    # The new bytes are half on disk when the failure (or a cancel) arrives.
    from lora_core import atomic

    def failing_sync(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", failing_sync)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, {"a.alpha": torch.tensor(2.0)}, {"steps": "2"})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]

    def cancelled_sync(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", cancelled_sync)
    with pytest.raises(KeyboardInterrupt):
        save_lora(path, {"a.alpha": torch.tensor(2.0)})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_truncated_corrupt_missing_and_pickle_files_are_user_errors(tmp_path):
    path = save_lora(tmp_path / "full.safetensors", {"a.lora_up.weight": torch.randn(64, 64)})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserInputError, match="truncated"):
        load_lora(truncated)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(data[:20])
    with pytest.raises(UserInputError, match="header length"):
        load_lora(header_cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    with pytest.raises(UserInputError, match="not valid safetensors JSON"):
        load_lora(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(UserInputError, match="only 3 bytes"):
        load_lora(tiny)
    with pytest.raises(UserInputError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    pickle_file = tmp_path / "old.ckpt"
    pickle_file.write_bytes(b"\x80\x04")
    with pytest.raises(UserInputError, match="pickle"):
        load_lora(pickle_file)
    with pytest.raises(UserInputError, match=".safetensors"):
        save_lora(tmp_path / "out.pt", {})


def test_kohya_export_names_and_reading_back(tmp_path):
    model = tiny_model()
    adapter_set = trained_set(model, "lora")
    state = adapter_set.to_state_dict()
    kohya = to_kohya(state)
    assert "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight" in kohya
    assert "lora_unet_transformer_blocks_0_attn1_to_out_0.alpha" in kohya
    assert "lora_unet_transformer_blocks_0_norm1.diff" in kohya
    path = save_kohya_lora(tmp_path / "kohya.safetensors", state, {"ss_network_dim": "2"})
    loaded, metadata = load_lora(path)
    names = [name for name, _ in model.named_modules() if name]
    internal = to_internal(loaded, metadata, names)
    assert internal.keys() == state.keys()
    assert all(torch.equal(internal[k], state[k]) for k in state)
    with pytest.raises(UserInputError, match="together with the model"):
        to_internal(loaded, metadata)


def test_lycoris_names_load_to_the_same_delta():
    model = tiny_model()
    names = [name for name, _ in model.named_modules() if name]
    for algorithm in ("loha", "lokr", "oft"):
        adapter_set = trained_set(model, algorithm, seed=4)
        lycoris = {}
        for name, adapter in adapter_set.adapter_items():
            for suffix, tensor in adapter.file_tensors().items():
                lycoris[f"lycoris_{name.replace('.', '_')}.{suffix}"] = tensor.detach()
        rebuilt = AdapterSet.from_state_dict(to_internal(lycoris, {}, names), model)
        assert_same_deltas(deltas(rebuilt, model), deltas(adapter_set, model))


def test_comfyui_trainer_format_with_flat_conv_factors_and_no_alpha():
    model = tiny_model()
    conv = model.proj_in
    up, down = torch.randn(8, 3), torch.randn(3, 4 * 9)
    state = {"diffusion_model.proj_in.lora_up.weight": up, "diffusion_model.proj_in.lora_down.weight": down,
             "diffusion_model.transformer_blocks.0.norm1.diff": torch.randn(8),
             "diffusion_model.transformer_blocks.0.norm1.diff_b": torch.randn(8)}
    adapter_set = AdapterSet.from_state_dict(to_internal(state, {}), model)
    # ComfyUI's loader: no alpha means scale 1
    torch.testing.assert_close(adapter_set.adapter_items()[0][1].delta_weight(conv.weight), (up @ down).reshape(8, 4, 3, 3))
    assert len(adapter_set.weight_diff_items()) == 1 and len(adapter_set.bias_diff_items()) == 1


@pytest.mark.parametrize("alpha_source", ["per_module", "metadata", "adapter_config", "default"])
def test_peft_files_load_to_the_same_delta(alpha_source):
    model = tiny_model()
    names = [name for name, _ in model.named_modules() if name]
    layer_name = "transformer_blocks.0.attn1.to_q"
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    state = {f"base_model.model.{layer_name}.lora_A.weight": down, f"base_model.model.{layer_name}.lora_B.weight": up}
    metadata = {}
    alpha = 6.0
    if alpha_source == "per_module":
        state[f"base_model.model.{layer_name}.alpha"] = torch.tensor(alpha)
    elif alpha_source == "metadata":
        metadata = {"lora_alpha": "6"}
    elif alpha_source == "adapter_config":
        metadata = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 1, "alpha_pattern": {"attn1.to_q": 6}})}
    else:
        alpha = 2.0  # PEFT without alpha information: alpha = rank, scale 1
    adapter_set = AdapterSet.from_state_dict(to_internal(state, metadata, names), model)
    expected = (alpha / 2) * up @ down
    torch.testing.assert_close(adapter_set.adapter_items()[0][1].delta_weight(torch.empty(8, 8)), expected)


def test_unknown_names_are_user_errors():
    model = tiny_model()
    names = [name for name, _ in model.named_modules() if name]
    with pytest.raises(UserInputError, match="down_blocks_0"):
        to_internal({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(1)}, {}, names)
    with pytest.raises(UserInputError, match="text_encoder"):
        to_internal({"text_encoder.something.weight": torch.zeros(1)}, {}, names)


# ---- names of other tools (issue 17) ------------------------------------------------------------
from lora_core.adapters.attach import attach_bypass, attach_merged  # noqa: E402
from lora_core.adapters.sliced import Slice, SlicedAdapter  # noqa: E402
from lora_core.lorafile.files import kohya_contents  # noqa: E402
from lora_core.lorafile.keys import KohyaNaming, adapter_set_from_tensors, lycoris_oft_to_comfy  # noqa: E402


class FusedBlock(nn.Module):
    """Flux-style attention: one qkv Linear where diffusers has to_q / to_k / to_v."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(q * k.sigmoid() + v)


FUSED_ALIASES = {f"transformer.blocks.0.attn.to_{p}": Slice("qkv", 8 * i, 8) for i, p in enumerate("qkv")}
FUSED_ALIASES["transformer.blocks.0.attn.to_out.0"] = "proj"


def diffusers_file(seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in FUSED_ALIASES:
        state[f"{name}.lora_A.weight"] = torch.randn(2, 8, generator=generator)
        state[f"{name}.lora_B.weight"] = torch.randn(8, 2, generator=generator)
    return state


def test_fused_qkv_slices_merge_and_bypass_like_comfyui():
    torch.manual_seed(0)
    model = FusedBlock()
    state = diffusers_file()
    adapter_set = adapter_set_from_tensors(state, {"lora_alpha": "4"}, model, aliases=FUSED_ALIASES)
    adapters = dict(adapter_set.adapter_items())
    assert set(adapters) == {"qkv", "proj"} and isinstance(adapters["qkv"], SlicedAdapter)
    # ComfyUI's loader: each to_q/k/v patch lands in its rows of qkv, scale alpha / rank = 2
    expected = torch.cat([2.0 * state[f"transformer.blocks.0.attn.to_{p}.lora_B.weight"]
                          @ state[f"transformer.blocks.0.attn.to_{p}.lora_A.weight"] for p in "qkv"])
    torch.testing.assert_close(adapters["qkv"].delta_weight(model.qkv.weight), expected)
    x = torch.randn(3, 8)
    with attach_merged(model, adapter_set, strength=0.7):
        merged = model(x)
    with attach_bypass(model, adapter_set, strength=0.7):
        bypass = model(x)
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-6)
    # Written back under the names that say which slice, and read again to the same adapters
    written = adapter_set.to_state_dict()
    assert "transformer.blocks.0.attn.to_k.lora_up.weight" in written and "diffusion_model.proj.lora_up.weight" in written
    again = adapter_set_from_tensors(written, {}, model, aliases=FUSED_ALIASES)
    torch.testing.assert_close(dict(again.adapter_items())["qkv"].delta_weight(model.qkv.weight), expected)
    with pytest.raises(UserInputError, match="slices of fused layers"):
        kohya_contents(written)


def test_fused_slices_train_in_bypass():
    torch.manual_seed(0)
    model = FusedBlock().requires_grad_(False)
    adapter_set = adapter_set_from_tensors(diffusers_file(), {}, model, aliases=FUSED_ALIASES)
    with attach_bypass(model, adapter_set):
        model(torch.randn(3, 8)).square().sum().backward()
    sliced = dict(adapter_set.adapter_items())["qkv"]
    assert all(part.down.grad is not None and part.down.grad.abs().sum() > 0 for part in sliced.parts)


def test_keys_matching_no_layer_name_the_model_they_seem_for():
    model = tiny_model()
    names = [name for name, _ in model.named_modules() if name]
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768)}
    with pytest.raises(UserInputError, match=r"attn2_to_k.*SD1\.x \(diffusers / kohya-ss SD1\.x block names\)"):
        to_internal(sd1, {}, names)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}
    with pytest.raises(UserInputError, match="made for Flux"):
        to_internal(flux, {}, names)
    wan = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 8)}
    with pytest.raises(UserInputError, match="made for Wan"):
        to_internal(wan, {}, names)


def test_kohya_export_uses_the_family_names_and_fields():
    model = tiny_model()
    state = trained_set(model, "lora").to_state_dict()
    names = {name: name.replace("transformer_blocks.0", "down_blocks.0.attentions.0.transformer_blocks.0")
             for name, _ in model.named_modules() if name}
    naming = KohyaNaming("SD1.x", names, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    tensors, header = kohya_contents(state, lora_metadata("lora", 2, 4.0, "all", 3), naming=naming)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in tensors
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_network_module"] == "networks.lora"
    _, lycoris_header = kohya_contents(trained_set(model, "loha").to_state_dict(), lora_metadata("loha", 2, 4.0, "all", 3),
                                       naming=naming)
    assert lycoris_header["ss_network_module"] == "lycoris.kohya"  # LyCORIS algorithms load through lycoris.kohya
    with pytest.raises(UserInputError, match="No kohya-ss export for Lumina2: not confirmed"):
        kohya_contents(state, naming=KohyaNaming("Lumina2", None, reason="not confirmed."))
    with pytest.raises(UserInputError, match="kohya-ss has no name for layers proj_in"):
        kohya_contents(state, naming=KohyaNaming("SD1.x", {k: v for k, v in names.items() if k != "proj_in"}))


def test_lycoris_oft_constraint_is_converted_and_ours_is_kept():
    blocks = torch.randn(4, 2, 2)
    lycoris = {"lycoris_proj.oft_blocks": blocks, "lycoris_proj.alpha": torch.tensor(0.01)}
    assert float(lycoris_oft_to_comfy(lycoris, {})["lycoris_proj.alpha"]) == pytest.approx(0.08)
    kohya_run = {"lora_unet_proj.oft_blocks": blocks, "lora_unet_proj.alpha": torch.tensor(0.01)}
    converted = lycoris_oft_to_comfy(kohya_run, {"ss_network_module": "lycoris.kohya"})
    assert float(converted["lora_unet_proj.alpha"]) == pytest.approx(0.08)
    ours = lora_metadata("oft", 2, 0.01, "all", 3)  # our files record ComfyUI's meaning
    assert float(lycoris_oft_to_comfy(kohya_run, {**ours, "ss_network_module": "lycoris.kohya"})["lora_unet_proj.alpha"]) == pytest.approx(0.01)
    assert float(lycoris_oft_to_comfy(kohya_run, {"lora_trainer.format_version": "1"})["lora_unet_proj.alpha"]) == pytest.approx(0.01)
