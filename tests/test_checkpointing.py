import pytest
import torch
from torch import nn

from lora_core.adapter_set import AdapterSet
from lora_core.adapters import AdapterSpec
from lora_core.attach import attach_bypass, attach_merged
from lora_core.checkpointing import GradientCheckpointing, find_checkpoint_blocks
from lora_core.targets import TargetSpec
from lora_core.toy import make_caption_embeddings, make_toy_denoiser


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.attn = nn.Sequential(nn.Linear(4, 4))
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x):
        return x + self.mlp(self.attn(self.norm(x)))


class UNetLike(nn.Module):
    """ComfyUI's UNet layout: a time MLP and an output head of bare layers, three block lists."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 4))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), nn.Sequential(Block())])
        self.middle_block = nn.Sequential(Block(), Block())
        self.output_blocks = nn.ModuleList([nn.Sequential(Block())])
        self.out = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))


class FluxLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(4, 4)
        self.double_blocks = nn.ModuleList([Block(), Block()])
        self.single_blocks = nn.ModuleList([Block(), Block(), Block()])


def test_blocks_are_found_at_the_first_level_with_block_lists():
    # Sequential blocks (ComfyUI's TimestepEmbedSequential) are stepped through by the UNet, never
    # called, so their members are wrapped; a member that is a bare layer is left alone.
    assert list(find_checkpoint_blocks(UNetLike())) == [
        "input_blocks.1.0", "middle_block.0", "middle_block.1", "output_blocks.0.0",
    ]
    assert list(find_checkpoint_blocks(FluxLike())) == [f"double_blocks.{i}" for i in range(2)] + [
        f"single_blocks.{i}" for i in range(3)
    ]
    # Deeper: the sub-blocks of each block, unless a bare Linear sits in it (kept whole).
    assert list(find_checkpoint_blocks(FluxLike(), depth=2))[:2] == ["double_blocks.0.attn", "double_blocks.0.mlp"]
    assert "input_blocks.1.0.attn" in find_checkpoint_blocks(UNetLike(), depth=2)


def _gradients(denoiser, adapter_set, bypass, checkpointing, depth=1):
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    sigma = torch.tensor([0.5, 2.0])
    conds = make_caption_embeddings(2)
    adapter_set.zero_grad(set_to_none=True)
    attach = attach_bypass if bypass else (lambda m, s: attach_merged(m, s, trainable=True))
    with attach(denoiser.module, adapter_set):
        checkpointed = GradientCheckpointing(denoiser.module, depth) if checkpointing else None
        if checkpointed:
            checkpointed.apply()
        try:
            denoiser.denoise(x_t, sigma, conds).square().mean().backward()
        finally:
            if checkpointed:
                checkpointed.remove()
    return {name: p.grad.clone() for name, p in adapter_set.named_parameters()}


@pytest.mark.parametrize("bypass", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_checkpointed_gradients_equal_plain_ones(bypass, depth):
    denoiser = make_toy_denoiser("eps")
    adapter_set = AdapterSet.create(
        denoiser.module, AdapterSpec(rank=4, alpha=4), TargetSpec(preset="all"), torch.Generator().manual_seed(0)
    )
    with torch.no_grad():  # make the up factors non-zero so every factor gets a gradient
        for name, parameter in adapter_set.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    plain = _gradients(denoiser, adapter_set, bypass, checkpointing=False)
    checkpointed = _gradients(denoiser, adapter_set, bypass, checkpointing=True, depth=depth)
    assert plain.keys() == checkpointed.keys()
    for name, gradient in plain.items():
        assert gradient.abs().sum() > 0, name
        assert torch.allclose(gradient, checkpointed[name], rtol=1e-5, atol=1e-7), name


def test_recompute_happens_and_forward_is_restored_even_on_error():
    model = FluxLike()
    block = model.double_blocks[0]
    inner_calls = []
    block.mlp.register_forward_pre_hook(lambda module, args: inner_calls.append(1))
    x = torch.randn(3, 4, requires_grad=True)

    block(x).sum().backward()
    assert len(inner_calls) == 1
    with pytest.raises(RuntimeError, match="boom"):
        with GradientCheckpointing(model):
            assert "forward" in block.__dict__
            block(x).sum().backward()
            assert len(inner_calls) == 3, "the block's inside runs again during backward"
            raise RuntimeError("boom")
    for module in model.modules():
        assert "forward" not in module.__dict__
    block(x).sum().backward()
    assert len(inner_calls) == 4

    with torch.no_grad(), GradientCheckpointing(model):  # no graph, nothing to recompute
        block(x)
    assert len(inner_calls) == 5


class SteppedUNet(nn.Module):
    """Like ComfyUI's UNet: each block is a Sequential whose members are called one by one."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(Block(), Block()), nn.Sequential(Block())])

    def forward(self, x):
        for block in self.input_blocks:
            for layer in block:
                x = layer(x)
        return x


def test_members_of_stepped_through_sequential_blocks_are_recomputed_in_backward():
    model = SteppedUNet().requires_grad_(False)
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, Block):
            # Counted inside the norm's forward, which the recomputation runs again (hooks on the
            # wrapped block itself are skipped by the checkpoint's direct call).
            module.norm.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    x = torch.randn(3, 4, requires_grad=True)
    with GradientCheckpointing(model, recompute_last_block=True):
        model(x).sum().backward()
    # Every block ran once forward and once more, recomputed, in backward.
    assert sorted(calls) == sorted(2 * ["input_blocks.0.0", "input_blocks.0.1", "input_blocks.1.0"])

    # By default the block that runs last keeps its activations (backward needs them at once).
    calls.clear()
    with GradientCheckpointing(model):
        model(x).sum().backward()
    assert sorted(calls) == sorted(2 * ["input_blocks.0.0", "input_blocks.0.1"] + ["input_blocks.1.0"])
