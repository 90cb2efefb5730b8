import contextlib

import pytest
import torch
from torch import nn

from lora_core.adapters.adapter_set import AdapterSet
from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import attach_bypass, attach_merged
from lora_core.memory.checkpointing import GradientCheckpointing, find_checkpoint_blocks
from lora_core.adapters.targets import TargetSpec
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


# ---- selective checkpointing: recompute only the blocks that hold the most memory per FLOP ----

class WideBlock(nn.Module):
    """Memory-heavy per FLOP: a trainable layer whose input autograd keeps, then cheap pointwise ops."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.act(self.proj(x)))


class DeepBlock(nn.Module):
    """Compute-heavy per byte: frozen layers save nothing for backward; only the last one trains."""

    def __init__(self, width):
        super().__init__()
        self.frozen = nn.Sequential(*[nn.Linear(width, width) for _ in range(6)])
        self.head = nn.Linear(width, width)

    def forward(self, x):
        return x + self.head(self.frozen(x))


class MixedNet(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.blocks = nn.ModuleList([WideBlock(width), DeepBlock(width), WideBlock(width), DeepBlock(width),
                                     WideBlock(width)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _mixed_net():
    torch.manual_seed(0)
    net = MixedNet()
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(".frozen." not in f".{name}")
    return net


def test_measure_block_counts_saved_activations_and_flops_but_not_weights_or_inputs():
    from lora_core.memory.checkpointing import measure_block

    net = _mixed_net()
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    x = torch.randn(3, 10, 16, requires_grad=True)
    wide = measure_block(net.blocks[0].forward, (x,), {}, weights)
    deep = measure_block(net.blocks[1].forward, (x,), {}, weights)
    # WideBlock: proj's output and the first GELU's output are kept (x itself is the block input);
    # DeepBlock: only the input of `head` (frozen layers keep nothing, their weights are excluded).
    activation = 3 * 10 * 16 * 4
    assert wide.saved_bytes == 2 * activation
    assert deep.saved_bytes == activation
    assert wide.flops == 2 * 3 * 10 * 16 * 16
    assert deep.flops == 7 * 2 * 3 * 10 * 16 * 16
    assert x.grad is None  # nothing ran backward


def test_choose_blocks_keeps_the_least_bytes_per_flop_within_the_budget():
    from lora_core.memory.checkpointing import BlockCost, choose_blocks

    costs = {"attn_hi": BlockCost(800, 10), "attn_lo": BlockCost(100, 10), "res": BlockCost(100, 100),
             "frozen": BlockCost(0, 50)}
    assert choose_blocks(costs, 0) == {"attn_hi", "attn_lo", "res"}  # every block that keeps anything
    assert choose_blocks(costs, 100) == {"attn_hi", "attn_lo"}       # res: 1 byte per FLOP, attn_lo: 10
    assert choose_blocks(costs, 250) == {"attn_hi"}
    assert choose_blocks(costs, 850) == {"attn_hi"}                   # attn_hi does not fit; the rest does
    assert choose_blocks(costs, 1000) == set()


def _recompute_counts(net, checkpointing, steps):
    calls = {i: 0 for i in range(len(net.blocks))}
    for i, block in enumerate(net.blocks):
        inner = block.proj if isinstance(block, WideBlock) else block.head
        inner.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    grads = []
    with checkpointing:
        for step in range(steps):
            for count in calls:
                calls[count] = 0
            x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(step))
            net.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    return calls, grads


ACTIVATION = 2 * 5 * 16 * 4  # bytes of one [2, 5, 16] float32 activation


def test_selective_checkpointing_recomputes_only_what_the_budget_needs_with_the_same_gradients():
    plain_calls, plain = _recompute_counts(_mixed_net(), contextlib.nullcontext(), steps=3)
    net = _mixed_net()
    budgets = []
    selective = GradientCheckpointing(net, keep_budget=lambda: budgets.append(1) or 2 * ACTIVATION)
    calls, grads = _recompute_counts(net, selective, steps=3)

    # The first forward measured every block but the last (never recomputed); then, asked once, the
    # budget of 2 activations keeps the two deep blocks (1 activation for 7 layers of FLOPs each);
    # the wide ones (2 activations for 1 layer) are recomputed.
    assert budgets == [1]
    assert {name: cost.saved_bytes for name, cost in selective.costs.items()} == {
        "blocks.0": 2 * ACTIVATION, "blocks.1": ACTIVATION, "blocks.2": 2 * ACTIVATION, "blocks.3": ACTIVATION}
    assert selective.recomputed == {"blocks.0", "blocks.2"}
    assert selective.kept_bytes() == 2 * ACTIVATION
    assert calls == {0: 2, 1: 1, 2: 2, 3: 1, 4: 1}, "only the chosen blocks run again in backward"
    assert plain_calls == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}
    for step in range(3):
        assert plain[step].keys() == grads[step].keys()
        for name, gradient in plain[step].items():
            assert torch.equal(gradient, grads[step][name]), (step, name)
    for module in net.modules():
        assert "forward" not in module.__dict__


def test_selective_checkpointing_recomputes_every_block_until_it_has_measured_them():
    net = _mixed_net()
    calls, _ = _recompute_counts(net, GradientCheckpointing(net, keep_budget=lambda: 10**9), steps=1)
    # first step: each block but the last runs once more to be measured, and is recomputed in backward
    assert calls == {0: 3, 1: 3, 2: 3, 3: 3, 4: 1}
    net = _mixed_net()
    calls, _ = _recompute_counts(net, GradientCheckpointing(net, keep_budget=lambda: 10**9), steps=2)
    assert calls == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}, "memory for everything: nothing is recomputed any more"
    net = _mixed_net()
    calls, _ = _recompute_counts(net, GradientCheckpointing(net, keep_budget=lambda: 0), steps=2)
    assert calls == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1}, "no memory to keep anything: every block, every step"


def test_trained_weights_do_not_depend_on_the_checkpoint_policy():
    from lora_core.toy import toy_dataset
    from lora_core.training.loop import TrainConfig, train

    results = {}
    for policy in (None, "all_blocks", "auto"):
        denoiser = make_toy_denoiser("eps")
        config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-3, seed=3, training_dtype="fp32",
                             gradient_checkpointing=policy is not None, checkpoint_policy=policy or "auto")
        results[policy] = train(denoiser, toy_dataset(4), config).adapter_set.state_dict()
    for policy in ("all_blocks", "auto"):
        for name, tensor in results[None].items():
            assert torch.equal(tensor, results[policy][name]), (policy, name)


def test_auto_budget_is_the_weights_on_the_device_capped_by_half_the_free_memory(monkeypatch):
    from lora_core.memory import device_memory

    net = _mixed_net()
    weight_bytes = sum(p.numel() * 4 for p in net.parameters())
    monkeypatch.setattr(device_memory, "free_memory", lambda device: 10 * weight_bytes)
    assert device_memory.activation_budget(net, torch.device("cpu")) == weight_bytes
    monkeypatch.setattr(device_memory, "free_memory", lambda device: weight_bytes)
    assert device_memory.activation_budget(net, torch.device("cpu")) == weight_bytes // 2
    monkeypatch.setattr(device_memory, "free_memory", lambda device: None)
    assert device_memory.activation_budget(net, torch.device("cpu")) == weight_bytes
    # weights elsewhere (offloaded, or another device) do not count
    assert device_memory.activation_budget(net, torch.device("meta")) == 0


def test_free_memory_on_a_cpu_is_the_available_ram():
    from lora_core.memory.device_memory import free_memory

    free = free_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_an_unknown_checkpoint_policy_is_refused_with_the_choices():
    from lora_core.errors import UserInputError
    from lora_core.training.loop import TrainConfig

    with pytest.raises(UserInputError, match="checkpoint_policy must be one of auto, all_blocks"):
        TrainConfig(checkpoint_policy="some")


class SoftmaxBlock(nn.Module):
    """Softmax and sigmoid save their own outputs for backward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return torch.sigmoid(self.proj(x).softmax(dim=-1))


def test_measuring_a_block_leaves_nothing_alive():
    import gc
    import weakref

    from lora_core.memory.checkpointing import measure_block

    block = SoftmaxBlock()
    x = torch.randn(4, 16, requires_grad=True) * 2  # a block input inside a graph, as in training
    created = []
    original = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        created.append(weakref.ref(out))
        return out

    torch.Tensor.softmax = spy
    try:
        cost = measure_block(block.forward, (x,), {}, set())
    finally:
        torch.Tensor.softmax = original
    gc.collect()
    assert cost.saved_bytes > 0
    assert created and all(ref() is None for ref in created), "the measured forward's activations are freed"


def test_measured_flops_include_attention_on_the_cpu():
    from lora_core.memory.checkpointing import measure_block

    q = torch.randn(1, 4, 64, 16, requires_grad=True)
    k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16)
    cost = measure_block(lambda q: torch.nn.functional.scaled_dot_product_attention(q, k, v), (q,), {}, set())
    assert cost.flops == 2 * (4 * 64 * 8) * (16 + 16)  # Q·Kᵀ and the weighted sum of V
