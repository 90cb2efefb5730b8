"""Each algorithm's three uses agree: bypass output == merged-weight output == base + F(delta),
fresh adapters are exact identities, and our tensors mean what ComfyUI's loader computes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_core.adapters import (
    ALGORITHMS,
    AdapterSpec,
    LoHa,
    adapter_from_tensors,
    block_layout,
    create_adapter,
    factorization,
)
from lora_core.adapters.geometry import LayerGeometry
from lora_core.adapters.loha import khatri_rao_factors
from lora_core.errors import UserInputError

LAYERS = {
    "linear": lambda: nn.Linear(12, 16),
    "conv1d": lambda: nn.Conv1d(8, 16, 3, padding=1),
    "conv2d": lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1),
    "conv3d": lambda: nn.Conv3d(4, 8, 3, padding=1),
}
INPUTS = {"linear": (3, 5, 12), "conv1d": (2, 8, 9), "conv2d": (2, 8, 7, 7), "conv3d": (2, 4, 4, 5, 5)}
# Relative to the output's magnitude; bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def spec_for(algorithm, rank=4):
    return AdapterSpec(algorithm=algorithm, rank=rank, alpha=3.0, oft_block_size=4)


def randomized(adapter, seed=0, size=0.3):
    """Give every parameter non-zero random values, so the delta is not trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * size)
    return adapter


def reference_output(layer, x, weight):
    """The layer's op with an explicit weight, in float64."""
    bias = layer.bias.double() if layer.bias is not None else None
    x = x.double()
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(layer)]
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def make(kind, dtype, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[kind]().to(dtype)
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return layer, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bypass_equals_merged_equals_base_plus_delta(algorithm, kind, dtype):
    layer, x = make(kind, dtype)
    adapter = randomized(create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(3)))
    strength = 0.7
    base = layer(x)
    bypass = adapter.bypass_output(x, base, layer, strength)
    delta = adapter.delta_weight(layer.weight)
    merged_layer = copy.deepcopy(layer)
    with torch.no_grad():
        merged_layer.weight.copy_((layer.weight.float() + strength * delta).to(dtype))
    merged = merged_layer(x)
    expected = reference_output(layer, x, layer.weight.double() + strength * delta.double())
    scale = expected.abs().max().item()
    tolerance = TOLERANCE[dtype] * scale
    assert bypass.dtype == dtype and bypass.shape == base.shape
    assert (bypass.double() - expected).abs().max().item() <= tolerance
    assert (merged.double() - expected).abs().max().item() <= tolerance
    # the delta is not negligible, so the agreement above means something
    assert (expected - base.double()).abs().max().item() > 50 * TOLERANCE[torch.float32] * scale


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fresh_adapter_is_exact_identity(algorithm, kind):
    layer, x = make(kind, torch.float32)
    adapter = create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(0))
    base = layer(x)
    assert torch.equal(adapter.bypass_output(x, base, layer, 1.0), base)
    delta = adapter.delta_weight(layer.weight)
    assert torch.count_nonzero(delta) == 0
    assert torch.equal(layer.weight + delta, layer.weight)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_init_draws_only_from_the_generator(algorithm):
    layer = nn.Linear(32, 32)
    first = create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # global RNG state must not matter
    second = create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(7))
    third = create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(8))
    for a, b, c in zip(first.parameters(), second.parameters(), third.parameters()):
        assert torch.equal(a, b)
    if algorithm != "oft":  # OFT starts from zero blocks; nothing random
        assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), third.parameters()))


def test_lora_init_is_kaiming_uniform_down_and_zero_up():
    adapter = create_adapter(AdapterSpec("lora", rank=16), nn.Linear(400, 8), torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(400)
    assert adapter.down.abs().max() <= bound and adapter.down.abs().max() > 0.9 * bound
    assert torch.count_nonzero(adapter.up) == 0
    assert adapter.down.shape == (16, 400) and adapter.up.shape == (8, 16)
    conv = create_adapter(AdapterSpec("lora", rank=4), nn.Conv2d(3, 6, 3), torch.Generator().manual_seed(0))
    assert conv.down.shape == (4, 3, 3, 3) and conv.up.shape == (6, 4, 1, 1)


def test_loha_khatri_rao_factors_equal_hadamard_product():
    generator = torch.Generator().manual_seed(0)
    w1_a, w2_a = torch.randn(10, 3, generator=generator), torch.randn(10, 5, generator=generator)
    w1_b, w2_b = torch.randn(3, 7, generator=generator), torch.randn(5, 7, generator=generator)
    up, down = khatri_rao_factors(w1_a, w1_b, w2_a, w2_b)
    assert up.shape == (10, 15) and down.shape == (15, 7)
    torch.testing.assert_close(up @ down, (w1_a @ w1_b) * (w2_a @ w2_b), rtol=1e-5, atol=1e-5)


def test_loha_dense_and_factored_bypass_agree():
    # rank 2 on a 64-wide layer takes the factored path, rank 6 (36 inner) the dense one
    layer = nn.Linear(64, 64)
    x = torch.randn(4, 64)
    for rank in (2, 6):
        adapter = randomized(create_adapter(spec_for("loha", rank), layer, torch.Generator().manual_seed(0)))
        expected = F.linear(x, adapter.delta_weight(layer.weight))
        got = adapter.bypass_output(x, torch.zeros(4, 64), layer, 1.0)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_grouped_conv_bypass_matches_merge():
    layer = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # 4 channels per group: OFT blocks of 2
    x = torch.randn(2, 8, 6, 6)
    for algorithm in ALGORITHMS:
        adapter = randomized(create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(0)))
        delta = adapter.delta_weight(layer.weight)
        expected = F.conv2d(x, layer.weight + delta, layer.bias, padding=1, groups=4)
        got = adapter.bypass_output(x, layer(x), layer, 1.0)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bypass_casts_fp32_adapter_to_input_dtype():
    layer = nn.Linear(12, 16).to(torch.bfloat16)
    adapter = randomized(create_adapter(spec_for("lora"), layer, torch.Generator().manual_seed(0)))
    assert adapter.down.dtype == torch.float32
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    assert adapter.bypass_output(x, layer(x), layer, 1.0).dtype == torch.bfloat16


class Float8Linear(nn.Linear):
    """Like ComfyUI's cast layers: the weight is stored in float8 and cast in forward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bypass_on_float8_weight_cast_in_forward(algorithm):
    layer = Float8Linear(16, 16)
    with torch.no_grad():
        layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    adapter = randomized(create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(0)))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = adapter.bypass_output(x, layer(x), layer, 1.0)
    assert layer.weight.dtype == torch.float8_e4m3fn  # untouched
    dequantized = layer.weight.double()
    expected = F.linear(x.double(), dequantized + adapter.delta_weight(dequantized).double(), layer.bias.double())
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() <= 3e-2 * expected.abs().max()


# ---- the file meaning: ComfyUI's loader formulas, restated from comfy/weight_adapter/*.py ----
def comfy_delta(tensors, weight):
    """What ComfyUI's calculate_weight adds at strength 1 (its formulas, written out here)."""
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if "lora_up.weight" in tensors:
        up, down = tensors["lora_up.weight"].float(), tensors["lora_down.weight"].float()
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return scale * torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
    if "hada_w1_a" in tensors:
        scale = alpha / tensors["hada_w1_b"].shape[0] if alpha is not None else 1.0
        m1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        m2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        return scale * (m1 * m2).reshape(weight.shape)
    if "oft_blocks" in tensors:
        blocks = tensors["oft_blocks"]
        n, b, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        if alpha and alpha > 0:
            norm = torch.norm(q) + 1e-8
            if norm > alpha:
                q = q * alpha / norm
        eye = torch.eye(b)
        r = (eye + q) @ (eye - q).float().inverse()
        return torch.einsum("k n m, k n ... -> k m ...", r - eye, weight.view(n, b, *weight.shape[1:])).reshape(weight.shape)
    dim = None
    w1 = tensors.get("lokr_w1")
    if w1 is None:
        dim = tensors["lokr_w1_b"].shape[0]
        w1 = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors.get("lokr_w2")
    if w2 is None:
        dim = tensors["lokr_w2_b"].shape[0]
        w2 = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(weight.shape)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("rank", [2, 12])
def test_file_tensors_mean_the_same_in_comfyui_loader(algorithm, kind, rank):
    layer, _ = make(kind, torch.float32)
    adapter = randomized(create_adapter(spec_for(algorithm, rank), layer, torch.Generator().manual_seed(0)))
    tensors = {k: v.detach() for k, v in adapter.file_tensors().items()}
    torch.testing.assert_close(
        adapter.delta_weight(layer.weight), comfy_delta(tensors, layer.weight.detach()), rtol=1e-4, atol=1e-5
    )
    rebuilt = adapter_from_tensors(tensors, layer, "layer")
    assert torch.equal(rebuilt.delta_weight(layer.weight), adapter.delta_weight(layer.weight))


def test_lokr_uses_full_w2_for_high_rank_and_scale_one():
    layer = nn.Linear(64, 64)
    low = create_adapter(AdapterSpec("lokr", rank=2, alpha=4.0), layer, torch.Generator().manual_seed(0))
    full = create_adapter(AdapterSpec("lokr", rank=64, alpha=4.0), layer, torch.Generator().manual_seed(0))
    assert "lokr_w2_a" in low.file_tensors() and low.scale == 2.0
    assert "lokr_w2" in full.file_tensors() and full.scale == 1.0


def test_factorization_matches_comfyui():
    # Values ComfyUI's `factorization` returns (checked against its code; its docstring table
    # differs for 360).
    assert factorization(128, -1) == (8, 16)
    assert factorization(1024, -1) == (32, 32)
    assert factorization(360, -1) == (18, 20)
    assert factorization(250, 4) == (2, 125)
    assert factorization(360, 16) == (15, 24)
    assert factorization(127, -1) == (1, 127)
    assert factorization(512, 8) == (8, 64)


def test_oft_layout_is_factorization_like_comfyui_trainer_and_lycoris():
    # (block count, block size) = factorization(out, oft_block_size) read as (size, count), as
    # ComfyUI's trainer (`factorization(out_dim, rank)`) and LyCORIS diag-oft do.
    assert block_layout(1280, 32) == (40, 32)
    assert block_layout(640, 32) == (32, 20)
    assert block_layout(320, 32) == (20, 16)
    assert block_layout(3072 * 3, 32) == (288, 32)
    for out in (4, 320, 640, 1280, 3072, 9216):  # LyCORIS rebuilds the layout from the block size
        count, size = block_layout(out, 32)
        assert size <= count and factorization(out, size) == (size, count)
    with pytest.raises(UserInputError, match="oft_block_size"):
        block_layout(13, 8)


def test_oft_constraint_limits_rotation():
    layer = nn.Linear(8, 8)
    spec = AdapterSpec("oft", alpha=0.01, oft_block_size=4)
    adapter = randomized(create_adapter(spec, layer, torch.Generator().manual_seed(0)), size=1.0)
    tensors = {k: v.detach() for k, v in adapter.file_tensors().items()}
    assert float(tensors["alpha"]) == pytest.approx(0.01)
    delta = adapter.delta_weight(layer.weight)
    torch.testing.assert_close(delta, comfy_delta(tensors, layer.weight.detach()), rtol=1e-4, atol=1e-6)
    assert delta.abs().max() < 0.05 * layer.weight.abs().max()


def test_shape_mismatch_and_bad_tensors_are_user_errors():
    adapter = create_adapter(spec_for("lora"), nn.Linear(12, 16), torch.Generator().manual_seed(0))
    tensors = adapter.file_tensors()
    with pytest.raises(UserInputError, match=r"\(16, 12\).*\(16, 10\)"):
        adapter_from_tensors(tensors, nn.Linear(10, 16), "blocks.0.to_q")
    with pytest.raises(UserInputError, match="lack lora_down.weight"):
        adapter_from_tensors({"lora_up.weight": tensors["lora_up.weight"]})
    with pytest.raises(UserInputError, match="DoRA"):
        adapter_from_tensors({**tensors, "dora_scale": torch.ones(16, 1)})
    with pytest.raises(UserInputError, match="mixes"):
        adapter_from_tensors({**tensors, "oft_blocks": torch.zeros(4, 4, 4)})


def test_missing_alpha_means_scale_one_like_comfyui():
    up, down = torch.randn(16, 4), torch.randn(4, 12)
    adapter = adapter_from_tensors({"lora_up.weight": up, "lora_down.weight": down})
    torch.testing.assert_close(adapter.delta_weight(torch.empty(16, 12)), up @ down)


@pytest.mark.parametrize(
    "field, value",
    [("algorithm", "dora"), ("rank", 0), ("alpha", float("nan")), ("lokr_factor", 0), ("oft_block_size", 1)],
)
def test_spec_validates_itself(field, value):
    with pytest.raises(UserInputError, match=field):
        AdapterSpec(**{field: value})


def test_non_adaptable_layer_is_user_error():
    with pytest.raises(UserInputError, match="LayerNorm"):
        LayerGeometry.of(nn.LayerNorm(4), "norm1")


def test_loha_rank_and_type():
    adapter = create_adapter(spec_for("loha", 3), nn.Linear(12, 16), torch.Generator().manual_seed(0))
    assert isinstance(adapter, LoHa) and adapter.rank == 3 and adapter.scale == 1.0


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
        (lambda: nn.Conv1d(4, 8, 3, padding="same", dilation=2), (2, 4, 10)),
        (lambda: nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), padding_mode="circular"), (1, 4, 2, 6, 6)),
    ],
    ids=["reflect", "same_dilated", "circular_3d"],
)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv_settings_are_honoured_in_bypass(algorithm, layer, shape):
    torch.manual_seed(0)
    layer = layer()
    x = torch.randn(shape)
    adapter = randomized(create_adapter(spec_for(algorithm), layer, torch.Generator().manual_seed(0)))
    merged = copy.deepcopy(layer)
    with torch.no_grad():
        merged.weight += adapter.delta_weight(layer.weight)
    torch.testing.assert_close(adapter.bypass_output(x, layer(x), layer, 1.0), merged(x), rtol=1e-4, atol=1e-5)


def test_lokr_foreign_factored_w1_and_conv2d_full_w2_mean_what_comfyui_computes():
    generator = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1)
    tensors = {
        "lokr_w1_a": torch.randn(4, 2, generator=generator),
        "lokr_w1_b": torch.randn(2, 2, generator=generator),
        "lokr_w2": torch.randn(4, 4, 3, 3, generator=generator),
        "alpha": torch.tensor(3.0),
    }
    adapter = adapter_from_tensors(tensors, layer, "conv")
    assert adapter.scale == 1.5  # alpha / rows of lokr_w1_b, as ComfyUI's loader divides
    torch.testing.assert_close(adapter.delta_weight(layer.weight), comfy_delta(tensors, layer.weight.detach()))
    x = torch.randn(1, 8, 5, 5)
    merged = F.conv2d(x, layer.weight + adapter.delta_weight(layer.weight), layer.bias, padding=1)
    torch.testing.assert_close(adapter.bypass_output(x, layer(x), layer, 1.0), merged, rtol=1e-4, atol=1e-5)
