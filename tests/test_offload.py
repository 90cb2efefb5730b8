"""Block offloading: same numbers as without it, one block resident at a time, model restored.

On the CPU the compute device is the storage device, but the mechanism still engages: each block
gets fresh copies on entry and shape-only meta placeholders on release, so what is checked here is
exactly what happens on a GPU, minus the transfer.
"""

import pytest
import torch
from torch import nn

from lora_core.adapters import AdapterSpec
from lora_core.adapters.attach import AdapterSet, attach_bypass
from lora_core.memory.checkpointing import GradientCheckpointing
from lora_core.errors import UserInputError
from lora_core.memory.offload import BlockOffloader, check_offloading
from lora_core.adapters.targets import TargetSpec
from lora_core.toy import ToyNetConfig, make_toy_denoiser


def toy_setup(seed: int = 0, depth: int = 3):
    """A toy net (3 blocks) with LoRA adapters whose `up` is non-zero, so every grad is non-trivial."""
    net = make_toy_denoiser("eps", seed=seed, config=ToyNetConfig(depth=depth)).module
    adapters = AdapterSet.create(net, AdapterSpec(rank=4, alpha=4), TargetSpec(preset="all"), torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    generator = torch.Generator().manual_seed(seed + 2)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.rand(2, generator=generator), torch.randn(2, 4, 8, generator=generator))
    return net, adapters, inputs


def loss_and_grads(net, adapters, inputs, offload: bool, depth: int = 1):
    adapters.zero_grad(set_to_none=True)
    with attach_bypass(net, adapters), GradientCheckpointing(net, depth):
        if offload:
            with BlockOffloader(net, "cpu", depth=depth) as offloader:
                loss = net(*inputs).square().mean()
                loss.backward()
                assert offloader.loads > len(offloader.blocks), "the backward recompute must load blocks again"
        else:
            loss = net(*inputs).square().mean()
            loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in adapters.named_parameters()}


def snapshot(net: nn.Module) -> dict[str, tuple]:
    return {
        name: (tensor, tensor.device, tensor.dtype, tensor.detach().clone())
        for name, tensor in [*net.named_parameters(), *net.named_buffers()]
    }


def assert_restored(net: nn.Module, before: dict[str, tuple]) -> None:
    after = dict([*net.named_parameters(), *net.named_buffers()])
    assert after.keys() == before.keys()
    for name, (tensor, device, dtype, values) in before.items():
        assert after[name] is tensor, f"{name}: a different object after offloading"
        assert tensor.device == device and tensor.dtype == dtype
        assert torch.equal(tensor.detach().view(torch.uint8), values.view(torch.uint8)), f"{name} changed"


def test_offloading_without_checkpointing_is_refused():
    check_offloading(offloading=True, gradient_checkpointing=True)
    check_offloading(offloading=False, gradient_checkpointing=False)
    with pytest.raises(UserInputError, match="offloading needs gradient_checkpointing on"):
        check_offloading(offloading=True, gradient_checkpointing=False)


@pytest.mark.parametrize("depth", [1, 2])
def test_loss_and_gradients_are_exactly_the_same_with_offloading(depth):
    # CPU float32: the same ops on the same values, so equality is exact (tolerance 0).
    net, adapters, inputs = toy_setup()
    loss, grads = loss_and_grads(net, adapters, inputs, offload=False, depth=depth)
    offloaded_loss, offloaded_grads = loss_and_grads(net, adapters, inputs, offload=True, depth=depth)
    assert torch.equal(loss, offloaded_loss)
    assert grads.keys() == offloaded_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        assert torch.equal(grads[name], offloaded_grads[name]), name


def test_optimizer_steps_with_offloading_give_the_same_adapter():
    results = []
    for offload in (False, True):
        net, adapters, inputs = toy_setup(seed=3)
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
        for _ in range(3):
            loss_and_grads(net, adapters, inputs, offload=offload)
            optimizer.step()
        results.append({k: v.detach().clone() for k, v in adapters.state_dict().items()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_only_the_running_block_holds_weights():
    net, adapters, inputs = toy_setup()
    seen = []  # (phase, block index, which blocks hold real weights)

    def holding(offloader):
        return {
            index
            for index, block in enumerate(net.blocks)
            if any(p.device.type != "meta" for m in block.children() for p in m.parameters())
        }

    checkpointing = GradientCheckpointing(net, recompute_last_block=True)  # every block recomputed
    with attach_bypass(net, adapters), checkpointing, BlockOffloader(net, "cpu") as offloader:
        assert holding(offloader) == set(), "nothing is loaded before the forward pass"
        phase = ["forward"]
        for index, block in enumerate(net.blocks):
            # Registered after the offloader's hooks, so these run after its load / release.
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.register_forward_pre_hook(lambda m, a, i=index: seen.append((phase[0], i, holding(offloader))))
            block.register_forward_hook(lambda m, a, o, i=index: seen.append(("after", i, holding(offloader))))
        loss = net(*inputs).square().mean()
        phase[0] = "backward"
        loss.backward()
        streamed = offloader.streamed_bytes()

    assert streamed == sum(p.numel() * p.element_size() for b in net.blocks for m in b.children() for p in m.parameters())
    for phase_name, index, held in seen:
        assert held == (set() if phase_name == "after" else {index}), (phase_name, index, held)
    # every block was seen running in the forward pass and again in the backward recompute,
    # which goes through the blocks in reverse
    backward_order = [i for p, i, _ in seen if p == "backward"]
    assert sorted(set(backward_order)) == [0, 1, 2]
    assert backward_order[0] == 2 and backward_order[-1] == 0
    assert [i for p, i, _ in seen if p == "after"] == [0, 1, 2]


def test_model_is_restored_bit_for_bit_after_training():
    net, adapters, inputs = toy_setup()
    before = snapshot(net)
    loss_and_grads(net, adapters, inputs, offload=True)
    assert_restored(net, before)


def test_model_is_restored_when_the_forward_raises_mid_block():
    net, adapters, inputs = toy_setup()
    before = snapshot(net)

    class Cancelled(BaseException):  # like ComfyUI's cancel: not an Exception
        pass

    def cancel(module, args):
        raise Cancelled

    handle = net.blocks[1].ff.net[2].register_forward_pre_hook(cancel)
    with pytest.raises(Cancelled):
        with attach_bypass(net, adapters), GradientCheckpointing(net), BlockOffloader(net, "cpu") as offloader:
            net(*inputs)
    handle.remove()
    assert offloader.loaded_blocks == set()
    assert_restored(net, before)


def test_no_grad_forward_matches_and_leaves_nothing_loaded():
    net, adapters, inputs = toy_setup()
    with torch.no_grad(), attach_bypass(net, adapters):
        expected = net(*inputs)
        with GradientCheckpointing(net), BlockOffloader(net, "cpu") as offloader:
            assert torch.equal(net(*inputs), expected)
            assert offloader.loaded_blocks == set()


def test_trainable_and_block_owned_parameters_stay_put():
    net, _, inputs = toy_setup()
    net.blocks[0].ff.net[0].weight.requires_grad_(True)  # a trainable weight inside a block
    net.blocks[1].register_parameter("scale", nn.Parameter(torch.ones(()), requires_grad=False))  # owned by the block itself
    trainable, owned = net.blocks[0].ff.net[0].weight, net.blocks[1].scale
    with BlockOffloader(net, "cpu"):
        assert net.blocks[0].ff.net[0].weight is trainable
        assert net.blocks[1].scale is owned
        assert net.blocks[0].ff.net[2].weight.device.type == "meta"
        assert net.conv_in.weight.device.type == "cpu", "layers outside the blocks stay resident"


def test_bad_blocks_are_explained():
    net, _, _ = toy_setup()
    with pytest.raises(UserInputError, match="overlap"):
        BlockOffloader(net, "cpu", blocks={"blocks.0": net.blocks[0], "blocks.0.ff": net.blocks[0].ff}).apply()
    flat = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(UserInputError, match="no blocks"):
        BlockOffloader(flat, "cpu").apply()


def test_weights_already_on_the_compute_device_can_be_left_to_the_host():
    # ComfyUI's partial loading puts some layers on the GPU itself; those are not streamed.
    net, adapters, inputs = toy_setup()
    before = snapshot(net)
    with attach_bypass(net, adapters), GradientCheckpointing(net):
        expected = net(*inputs)
        with BlockOffloader(net, "cpu", stream_resident=False) as offloader:
            assert offloader.streamed_bytes() == 0
            assert torch.equal(net(*inputs), expected)
    assert_restored(net, before)


def test_trainable_merge_mode_streams_the_parametrized_weight_too():
    # attach_merged(trainable=True) moves the weight under a parametrization; the layer's own
    # pre-hook still loads it, and gradients are unchanged.
    from lora_core.adapters.attach import attach_merged

    net, adapters, inputs = toy_setup()
    grads = []
    for offload in (False, True):
        adapters.zero_grad(set_to_none=True)
        with attach_merged(net, adapters, trainable=True), GradientCheckpointing(net):
            if offload:
                with BlockOffloader(net, "cpu") as offloader:
                    assert offloader.streamed_bytes() > 0
                    net(*inputs).square().mean().backward()
            else:
                net(*inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in adapters.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_weight_tied_across_blocks_stays_resident():
    net, adapters, inputs = toy_setup()
    net.blocks[1].ff.net[0].weight = net.blocks[0].ff.net[0].weight  # tied
    tied = net.blocks[0].ff.net[0].weight
    loss, grads = loss_and_grads(net, adapters, inputs, offload=False)
    with BlockOffloader(net, "cpu"):
        assert net.blocks[0].ff.net[0].weight is tied and net.blocks[1].ff.net[0].weight is tied
    offloaded_loss, offloaded_grads = loss_and_grads(net, adapters, inputs, offload=True)
    assert torch.equal(loss, offloaded_loss)
    assert all(torch.equal(grads[name], offloaded_grads[name]) for name in grads)


def test_the_engine_trains_the_same_adapter_with_offloading():
    from lora_core.toy import toy_dataset

    from lora_core.training.loop import TrainConfig, train

    results = []
    for offloading in (False, True):
        config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-2, training_dtype="fp32", bypass=True,
                             targets=TargetSpec(preset="all"), gradient_checkpointing=True, offloading=offloading,
                             validation_every_steps=2)
        denoiser = make_toy_denoiser("eps", config=ToyNetConfig(depth=3))
        before = snapshot(denoiser.module)
        results.append(train(denoiser, toy_dataset(), config))
        assert_restored(denoiser.module, before)
    assert results[0].loss == results[1].loss and results[0].val_loss == results[1].val_loss
    first, second = (r.adapter_set.to_state_dict() for r in results)
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(UserInputError, match="offloading needs gradient_checkpointing on"):
        TrainConfig(offloading=True, gradient_checkpointing=False)
