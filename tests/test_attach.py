"""Targets, AdapterSet state dicts, and attaching: bypass == merged == trainable merged, removal
restores the model bit for bit (also after an exception or a BaseException), stacking adds."""

import copy

import pytest
import torch
from torch import nn

from lora_core.adapters import ALGORITHMS, AdapterSpec
from lora_core.adapters.attach import AdapterSet, attach_bypass, attach_merged
from lora_core.errors import UserInputError
from lora_core.adapters.targets import TargetSpec, find_norms, find_targets


class Module(nn.Module):
    """A container whose children are given by name."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class ProjGELU(nn.Module):
    """ComfyUI's GELU/GEGLU feed-forward input: a module holding `proj`."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return nn.functional.gelu(self.proj(x))


def attention(dim):
    return Module(to_q=nn.Linear(dim, dim, bias=False), to_k=nn.Linear(dim, dim, bias=False),
                  to_v=nn.Linear(dim, dim, bias=False), to_out=nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0)))


class TinyUNetBlock(nn.Module):
    """SD1.5 names: input_blocks.1.1.{proj_in, transformer_blocks.0.{attn1, attn2, ff.net}, proj_out}
    plus a resnet conv and an embedding layer that the presets must leave out."""

    def __init__(self, channels=8):
        super().__init__()
        block = Module(
            norm1=nn.LayerNorm(channels), attn1=attention(channels), attn2=attention(channels),
            ff=Module(net=nn.Sequential(ProjGELU(channels, channels * 2), nn.Dropout(0.0), nn.Linear(channels * 2, channels))),
        )
        transformer = Module(norm=nn.GroupNorm(2, channels), proj_in=nn.Conv2d(channels, channels, 1),
                             transformer_blocks=nn.ModuleList([block]), proj_out=nn.Conv2d(channels, channels, 1))
        resnet = Module(in_layers=nn.Sequential(nn.GroupNorm(2, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)))
        self.time_embed = nn.Sequential(nn.Linear(channels, channels))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, channels, 3, padding=1)), Module(**{"0": resnet, "1": transformer})])

    def forward(self, x):
        h = self.input_blocks[0](x)
        resnet, transformer = self.input_blocks[1]._modules["0"], self.input_blocks[1]._modules["1"]
        h = h + resnet.in_layers(h)
        b, c, hh, ww = h.shape
        t = transformer.proj_in(transformer.norm(h)).flatten(2).transpose(1, 2)
        block = transformer.transformer_blocks[0]
        n = block.norm1(t)
        for attn in (block.attn1, block.attn2):
            q, k, v = attn.to_q(n), attn.to_k(n), attn.to_v(n)
            weights = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)
            t = t + attn.to_out(weights @ v)
        t = t + block.ff.net(t)
        t = t.transpose(1, 2).reshape(b, c, hh, ww)
        return transformer.proj_out(t) + self.time_embed(h.mean((2, 3)))[:, :, None, None]


def flux_and_sd3_names():
    flux_double = Module(img_attn=Module(qkv=nn.Linear(8, 24), proj=nn.Linear(8, 8), norm=Module(query_norm=nn.RMSNorm(8))),
                         img_mlp=nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)),
                         img_mod=Module(lin=nn.Linear(8, 48)))
    flux_single = Module(linear1=nn.Linear(8, 56), linear2=nn.Linear(40, 8), modulation=Module(lin=nn.Linear(8, 24)))
    sd3 = Module(x_block=Module(attn=Module(qkv=nn.Linear(8, 24), proj=nn.Linear(8, 8)),
                                mlp=Module(fc1=nn.Linear(8, 32), fc2=nn.Linear(32, 8)),
                                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(8, 48))))
    return Module(double_blocks=nn.ModuleList([flux_double]), single_blocks=nn.ModuleList([flux_single]),
                  joint_blocks=nn.ModuleList([sd3]), x_embedder=Module(proj=nn.Conv2d(4, 8, 2, stride=2)),
                  final_layer=Module(linear=nn.Linear(8, 16)))


def test_presets_on_sd15_names():
    model = TinyUNetBlock()
    attention_only = set(find_targets(model, TargetSpec(preset="attention")))
    prefix = "input_blocks.1.1.transformer_blocks.0."
    assert attention_only == {f"{prefix}{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    default = set(find_targets(model, TargetSpec()))
    assert default == attention_only | {f"{prefix}ff.net.0.proj", f"{prefix}ff.net.2",
                                        "input_blocks.1.1.proj_in", "input_blocks.1.1.proj_out"}
    everything = set(find_targets(model, TargetSpec(preset="all")))
    # The res-block conv joins; the time embedding and the first conv (embedders) stay out unless asked.
    assert everything == default | {"input_blocks.1.0.in_layers.2"}
    asked = set(find_targets(model, TargetSpec(preset="all", include=[r"^time_embed\.", r"^input_blocks\.0\.0$"])))
    assert asked == everything | {"time_embed.0", "input_blocks.0.0"}


def test_presets_on_flux_and_sd3_names():
    model = flux_and_sd3_names()
    assert set(find_targets(model, TargetSpec(preset="attention"))) == {
        "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
        "single_blocks.0.linear1", "single_blocks.0.linear2",
        "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj",
    }
    default = set(find_targets(model, TargetSpec()))
    assert {"double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
            "joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.x_block.mlp.fc2"} <= default
    assert not {"double_blocks.0.img_mod.lin", "x_embedder.proj", "final_layer.linear",
                "joint_blocks.0.x_block.adaLN_modulation.1"} & default
    everything = set(find_targets(model, TargetSpec(preset="all")))
    assert default <= everything
    assert not {"double_blocks.0.img_mod.lin", "x_embedder.proj", "final_layer.linear",
                "joint_blocks.0.x_block.adaLN_modulation.1"} & everything


def test_include_exclude_and_bad_regex():
    model = flux_and_sd3_names()
    spec = TargetSpec(preset="attention", include=[r"final_layer"], exclude=[r"^joint_blocks", r"linear2$"])
    assert set(find_targets(model, spec)) == {
        "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear1", "final_layer.linear"}
    with pytest.raises(UserInputError, match=r"include pattern '\(attn'"):
        TargetSpec(include=["(attn"])
    with pytest.raises(UserInputError, match="preset"):
        TargetSpec(preset="everything")


def test_norms_found_only_when_asked():
    model = TinyUNetBlock()
    assert find_norms(model, TargetSpec()) == {}
    norms = find_norms(model, TargetSpec(train_norms_and_biases=True, exclude=["in_layers"]))
    assert set(norms) == {"input_blocks.1.1.norm", "input_blocks.1.1.transformer_blocks.0.norm1"}


def random_set(model, algorithm, seed, targets=None, size=0.2):
    targets = targets or TargetSpec(preset="all", include=[r"^time_embed\.", r"^input_blocks\.0\.0$"],
                                    train_norms_and_biases=True)
    spec = AdapterSpec(algorithm=algorithm, rank=2, alpha=2.0, oft_block_size=4)
    adapter_set = AdapterSet.create(model, spec, targets, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in adapter_set.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * size)
    return adapter_set


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


def model_and_input(seed=0):
    torch.manual_seed(seed)
    return TinyUNetBlock().eval(), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_three_modes_agree_and_detach_restores(algorithm):
    model, x = model_and_input()
    before = snapshot(model)
    base = model(x)
    adapter_set = random_set(model, algorithm, seed=1)
    with attach_bypass(model, adapter_set, strength=0.6):
        bypass = model(x)
    assert_bit_identical(model, before)
    with attach_merged(model, adapter_set, strength=0.6):
        merged = model(x)
    assert_bit_identical(model, before)
    with attach_merged(model, adapter_set, strength=0.6, trainable=True):
        trainable = model(x)
    assert_bit_identical(model, before)
    assert (bypass - base).abs().max() > 1e-2
    torch.testing.assert_close(bypass, merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainable, merged, rtol=1e-4, atol=1e-5)
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("trainable", [None, True], ids=["bypass", "merged_trainable"])
def test_gradients_reach_every_adapter_parameter(trainable):
    model, x = model_and_input()
    model.requires_grad_(False)
    adapter_set = random_set(model, "lora", seed=1)
    attach = (lambda: attach_bypass(model, adapter_set)) if trainable is None else (lambda: attach_merged(model, adapter_set, trainable=True))
    with attach():
        model(x).square().mean().backward()
    missing = [n for n, p in adapter_set.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["bypass", "merged", "trainable"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_detach_restores_after_exception_and_base_exception(mode, error):
    model, x = model_and_input()
    before = snapshot(model)
    adapter_set = random_set(model, "oft", seed=1)
    attach = {
        "bypass": lambda: attach_bypass(model, adapter_set),
        "merged": lambda: attach_merged(model, adapter_set),
        "trainable": lambda: attach_merged(model, adapter_set, trainable=True),
    }[mode]
    with pytest.raises(error):
        with attach():
            model(x)
            raise error("cancelled")
    assert_bit_identical(model, before)


def test_failed_attach_undoes_what_it_did():
    model, _ = model_and_input()
    before = snapshot(model)
    adapter_set = random_set(model, "lora", seed=1)
    adapter_set.adapters["does%2Enot%2Eexist"] = adapter_set.adapters[next(iter(adapter_set.adapters))]
    for attach in (attach_bypass, attach_merged):
        with pytest.raises(UserInputError, match="does.not.exist"):
            attach(model, adapter_set)
        assert_bit_identical(model, before)


@pytest.mark.parametrize("modes", [("bypass", "bypass"), ("merged", "merged"), ("trainable", "merged"), ("bypass", "trainable")])
def test_stacking_two_sets_applies_both_deltas(modes):
    model, x = model_and_input()
    before = snapshot(model)
    first, second = random_set(model, "lora", seed=1), random_set(model, "loha", seed=2)
    # reference: both deltas merged into a copy by hand
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for adapter_set, strength in ((first, 0.5), (second, -0.8)):
            for name, adapter in adapter_set.adapter_items():
                weight = reference.get_submodule(name).weight
                weight += strength * adapter.delta_weight(weight)
            for name, diff in adapter_set.weight_diff_items():
                reference.get_submodule(name).weight.add_(strength * diff)
            for name, diff in adapter_set.bias_diff_items():
                reference.get_submodule(name).bias.add_(strength * diff)
    expected = reference(x)

    def attach(mode, adapter_set, strength):
        if mode == "bypass":
            return attach_bypass(model, adapter_set, strength)
        return attach_merged(model, adapter_set, strength, trainable=mode == "trainable")

    one = attach(modes[0], first, 0.5)
    two = attach(modes[1], second, -0.8)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    one.remove()  # out of order: the second set stays applied alone
    alone = model(x)
    two.remove()
    assert_bit_identical(model, before)
    with attach_merged(model, second, -0.8):
        torch.testing.assert_close(alone, model(x), rtol=1e-4, atol=1e-5)
    assert_bit_identical(model, before)


def test_bypass_sees_input_passed_by_keyword():
    layer = Module(attn=Module(to_q=nn.Linear(8, 8)))
    adapter_set = random_set(layer, "lora", seed=0, targets=TargetSpec(preset="attention"))
    x = torch.randn(2, 8)
    with attach_bypass(layer, adapter_set):
        assert torch.equal(layer.attn.to_q(input=x), layer.attn.to_q(x))
        assert not torch.equal(layer.attn.to_q(x), nn.functional.linear(x, layer.attn.to_q.weight, layer.attn.to_q.bias))


def test_remove_is_idempotent():
    model, x = model_and_input()
    adapter_set = random_set(model, "lokr", seed=1)
    attachment = attach_merged(model, adapter_set)
    attachment.remove()
    attachment.remove()
    assert not attachment.attached


class Float8Linear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_bypass_on_float8_model_and_merge_refuses_lazy_weight():
    model = Module(attn=Module(to_q=Float8Linear(16, 16), to_k=Float8Linear(16, 16)))
    for layer in model.attn.children():
        layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    before = snapshot(model)
    adapter_set = random_set(model, "lora", seed=0, targets=TargetSpec(preset="attention"))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with attach_bypass(model, adapter_set):
        out = model.attn.to_q(x)
    assert out.dtype == torch.bfloat16
    assert_bit_identical(model, before)
    model.attn.to_k.weight = None
    with pytest.raises(UserInputError, match="bypass"):
        attach_merged(model, adapter_set)
    assert torch.equal(model.attn.to_q.weight.float(), before["attn.to_q.weight"].float())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_state_dict_round_trip_and_keys(algorithm):
    model, x = model_and_input()
    adapter_set = random_set(model, algorithm, seed=3)
    state = adapter_set.to_state_dict()
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert f"diffusion_model.{name}.alpha" in state
    assert "diffusion_model.input_blocks.1.1.norm.diff" in state
    assert "diffusion_model.input_blocks.1.1.proj_in.diff_b" in state
    assert all(k.startswith("diffusion_model.") for k in state)
    rebuilt = AdapterSet.from_state_dict(state, model)
    assert rebuilt.to_state_dict().keys() == state.keys()
    assert all(torch.equal(rebuilt.to_state_dict()[k], v) for k, v in state.items())
    with attach_bypass(model, adapter_set):
        expected = model(x)
    with attach_bypass(model, rebuilt):
        assert torch.equal(model(x), expected)


def test_from_state_dict_errors_name_module_and_shapes():
    model, _ = model_and_input()
    state = random_set(model, "lora", seed=3).to_state_dict()
    other = TinyUNetBlock(channels=12)
    with pytest.raises(UserInputError, match=r"time_embed\.0.*\(8, 8\).*\(12, 12\)"):
        AdapterSet.from_state_dict({k: v for k, v in state.items() if ".time_embed." in k and not k.endswith(".diff_b")}, other)
    with pytest.raises(UserInputError, match="nowhere.to_q"):
        AdapterSet.from_state_dict({"diffusion_model.nowhere.to_q.lora_up.weight": torch.zeros(2, 2),
                                    "diffusion_model.nowhere.to_q.lora_down.weight": torch.zeros(2, 2)}, model)
    with pytest.raises(UserInputError, match="to_internal"):
        AdapterSet.from_state_dict({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(UserInputError, match=r"input_blocks\.1\.1\.norm.*\(3,\).*\(8,\)"):
        AdapterSet.from_state_dict({"diffusion_model.input_blocks.1.1.norm.diff": torch.zeros(3)}, model)


def test_create_is_deterministic_and_needs_targets():
    model, _ = model_and_input()
    spec = AdapterSpec("lora", rank=4)
    a = AdapterSet.create(model, spec, TargetSpec(), torch.Generator().manual_seed(5)).to_state_dict()
    b = AdapterSet.create(model, spec, TargetSpec(), torch.Generator().manual_seed(5)).to_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserInputError, match="No layer"):
        AdapterSet.create(model, spec, TargetSpec(preset="attention", exclude=["."]), torch.Generator())


def test_plain_diffs_from_foreign_files_in_bypass_equal_merge():
    """ComfyUI's trainer writes `.diff` for 1-D weights (norms, here an RMSNorm) and `.diff_b` for
    every bias; other tools write full `.diff` weights for Linear layers."""
    torch.manual_seed(0)
    model = Module(norm=nn.RMSNorm(8), proj=nn.Linear(8, 8), out=nn.Conv1d(8, 4, 3, padding=1))
    x = torch.randn(2, 5, 8)

    def run():
        return model.out(model.proj(model.norm(x)).transpose(1, 2))

    before = snapshot(model)
    generator = torch.Generator().manual_seed(1)
    state = {
        "diffusion_model.norm.diff": torch.randn(8, generator=generator),
        "diffusion_model.proj.diff": torch.randn(8, 8, generator=generator) * 0.1,
        "diffusion_model.proj.diff_b": torch.randn(8, generator=generator),
        "diffusion_model.out.diff_b": torch.randn(4, generator=generator),
    }
    adapter_set = AdapterSet.from_state_dict(state, model)
    with attach_bypass(model, adapter_set, 0.5):
        bypass = run()
    with attach_merged(model, adapter_set, 0.5):
        merged = run()
    assert_bit_identical(model, before)
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-5)
    assert (bypass - run()).abs().max() > 0.05


class QuantizedStyleLinear(nn.Module):
    """Like ComfyUI's mixed-precision Linear: not an nn.Linear, but named Linear with
    in_features/out_features, and its weight is not a plain tensor."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed = nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
        self.bias = None

    def forward(self, x):
        return nn.functional.linear(x, self.packed.to(x.dtype))


QuantizedStyleLinear.__name__ = "Linear"


def test_linear_like_quantized_layer_is_targeted_and_trains_in_bypass():
    model = Module(attn=Module(to_q=QuantizedStyleLinear(8, 8)))
    assert list(find_targets(model, TargetSpec(preset="attention"))) == ["attn.to_q"]
    adapter_set = random_set(model, "lokr", seed=0, targets=TargetSpec(preset="attention"))
    x = torch.randn(3, 8)
    with attach_bypass(model, adapter_set):
        out = model.attn.to_q(x)
    delta = adapter_set.adapter_items()[0][1].delta_weight(model.attn.to_q.packed)
    torch.testing.assert_close(out, nn.functional.linear(x, model.attn.to_q.packed + delta), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserInputError, match="bypass"):
        attach_merged(model, adapter_set)
