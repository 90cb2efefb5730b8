"""AutogradSafety: model code that writes into tensors autograd saved trains with exact gradients,
checkpointed or not, and nothing of it is left once the run is over or in other threads.

The modules below write in place the way ComfyUI's inference code does (Flux's `x += ...` after
`norm(x)`, LTX's `x.addcmul_(...)`, Flux's `img[:, :n] += add`); each has an out-of-place twin
with the same weights, the reference its gradients must equal.
"""

import contextlib
import threading

import pytest
import torch
from torch import nn

from lora_core.adapters import AdapterSpec
from lora_core.adapters.targets import TargetSpec
from lora_core.memory.autograd_safety import AutogradSafety, active_session, augmented_patch_installed
from lora_core.memory.checkpointing import GradientCheckpointing
from lora_core.toy import ToyBlock, make_toy_denoiser, toy_dataset
from lora_core.training.loop import TrainConfig, train

ORIGINAL_IADD = torch._C.TensorBase.__iadd__


class InPlaceBlock(nn.Module):
    """Writes into its input and into tensors saved for backward, five ways."""

    def __init__(self, width: int, out_of_place: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.ff = nn.Linear(width, width)
        self.out_of_place = out_of_place

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.out_of_place:
            x = x + self.attn(self.norm(x))
            y = torch.sigmoid(self.gate(x))
            x = torch.addcmul(x, y, scale)
            x = x * 1.5
            head = x[:, :2] + self.ff(x)[:, :2]
            x = torch.cat([head, x[:, 2:]], dim=1)
            return torch.relu(x)
        x += self.attn(self.norm(x))  # augmented assignment on the block input, saved by norm
        y = torch.sigmoid(self.gate(x))  # sigmoid saves its output y; gate saves x
        x.addcmul_(y, scale)  # in-place method into the saved x
        x *= 1.5
        x[:, :2] += self.ff(x)[:, :2]  # a view: writes reach x; ff saved all of x
        return torch.relu_(x)  # in place into a tensor ff's backward reads


class Net(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3, out_of_place: bool = False):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(InPlaceBlock(width, out_of_place) for _ in range(depth))
        self.out = nn.Linear(width, width)

    def forward(self, x):
        scale = torch.full((x.shape[-1],), 0.3, dtype=x.dtype)
        x = self.inp(x)
        for block in self.blocks:
            x = block(x, scale)
        return self.out(x)


def twins(dtype=torch.float64):
    torch.manual_seed(0)
    reference = Net(out_of_place=True).to(dtype)
    model = Net().to(dtype)
    model.load_state_dict(reference.state_dict())
    return reference, model


def inputs(dtype=torch.float64):
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


def gradients(model, x, checkpointing: bool = False, safety: AutogradSafety | None = None):
    model.zero_grad(set_to_none=True)
    blocks = GradientCheckpointing(model, recompute_last_block=True) if checkpointing else contextlib.nullcontext()
    with safety if safety is not None else contextlib.nullcontext(), blocks:
        model(x.clone()).pow(2).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def loss_of(model, x, direction, eps):
    with torch.no_grad():
        offsets = []
        start = 0
        for p in model.parameters():
            n = p.numel()
            offsets.append(direction[start:start + n].view_as(p))
            start += n
        for p, d in zip(model.parameters(), offsets):
            p.add_(eps * d)
        value = model(x.clone()).pow(2).sum().item()
        for p, d in zip(model.parameters(), offsets):
            p.sub_(eps * d)
    return value


def test_the_test_module_really_breaks_plain_autograd():
    _, model = twins()
    with pytest.raises(RuntimeError, match="inplace operation"):
        gradients(model, inputs())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("out_of_place_augmented", [True, False])
def test_gradients_equal_the_out_of_place_rewrite(checkpointing, out_of_place_augmented):
    reference, model = twins()
    x = inputs()
    expected = gradients(reference, x)
    safety = AutogradSafety(out_of_place_augmented=out_of_place_augmented)
    got = gradients(model, x, checkpointing, safety)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert safety.copies > 0  # the in-place methods hit saved memory: copy-on-write did the work
    if out_of_place_augmented:
        assert safety.out_of_place > 0


class KeywordBlock(nn.Module):
    """Takes its input by keyword (as Flux's blocks do) and writes into it."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)

    def forward(self, *, img: torch.Tensor) -> torch.Tensor:
        img.add_(self.attn(self.norm(img)))
        return img


class KeywordNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(KeywordBlock(width) for _ in range(2))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(img=x)
        return x


def test_a_keyword_input_written_in_place_inside_a_checkpointed_block():
    torch.manual_seed(0)
    model = KeywordNet().double()
    x = inputs()
    plain = gradients(model, x, False, AutogradSafety())
    checkpointed = gradients(model, x, True, AutogradSafety())
    torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=1e-12)


def test_gradients_match_central_finite_differences():
    _, model = twins()
    x = inputs()
    grad = gradients(model, x, checkpointing=True, safety=AutogradSafety())
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-6
    finite = (loss_of(model, x, direction, eps) - loss_of(model, x, direction, -eps)) / (2 * eps)
    analytic = (grad * direction).sum().item()
    assert abs(finite - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_checkpointed_equals_unchecked_in_float32():
    _, model = twins(torch.float32)
    x = inputs(torch.float32)
    plain = gradients(model, x, False, AutogradSafety())
    checkpointed = gradients(model, x, True, AutogradSafety())
    torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)


def test_forward_values_are_those_of_the_code_as_written():
    reference, model = twins()
    x = inputs()
    with torch.no_grad():
        expected = model(x.clone())  # no autograd: in place, as the code says
    with AutogradSafety():
        got = model(x.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference(x.clone()), expected)


@torch.library.custom_op("lora_trainer_test::fill_second", mutates_args=("target",))
def fill_second(source: torch.Tensor, target: torch.Tensor) -> None:
    target.fill_(float(source.sum()))


WRITES = {
    "method": lambda h: h.add_(1.0),
    "aten_overload": lambda h: torch.ops.aten.add_.Tensor(h, torch.ones_like(h)),
    "aten_packet": lambda h: torch.ops.aten.add_(h, torch.ones_like(h)),
    "out": lambda h: torch.mul(h, 3.0, out=h),
    "functional_inplace": lambda h: torch.nn.functional.relu(h, inplace=True),
    "setitem": lambda h: h.__setitem__(slice(1, 3), 0.0),
    "copy": lambda h: h.copy_(torch.zeros_like(h)),
    "custom_op_second_argument": lambda h: torch.ops.lora_trainer_test.fill_second(torch.ones(2), h),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_every_way_of_writing_into_saved_memory_is_seen(write):
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with AutogradSafety() as safety:
        h = a * 2.0
        out = (h * h).sum()  # saves h
        with torch.no_grad():
            WRITES[write](h)
        out.backward()
    assert safety.copies >= 1
    torch.testing.assert_close(a.grad, 8 * a.detach())


def test_a_write_beside_the_saved_bytes_copies_nothing():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with AutogradSafety() as safety:
        img = a * 1.0
        tail = img[:, 3:]
        out = (tail * tail).sum()  # saves the tail only
        img[:, :3] += 1.0  # same storage, other bytes
        out.backward()
    assert safety.copies == 0
    torch.testing.assert_close(a.grad[:, 3:], 2 * a.detach()[:, 3:])


def test_a_write_the_mode_cannot_see_is_an_error_not_a_wrong_gradient():
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with AutogradSafety():
        h = a * 2.0
        out = (h * h).sum()
        with torch._C.DisableTorchFunction():
            h.add_(1.0)  # invisible to any torch-function mode
        with pytest.raises(RuntimeError, match="modified in place by an operation the in-place safety could not see"):
            out.backward()


def test_an_op_without_autograd_runs_its_reference_while_training():
    @torch.library.custom_op("lora_trainer_test::fused_scale_shift", mutates_args=())
    def fused(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale) + 0.5

    def reference(x, scale):
        return x * (1 + scale) + 0.5

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        torch.ops.lora_trainer_test.fused_scale_shift(x, scale).sum().backward()
    x.grad = None
    with AutogradSafety({torch.ops.lora_trainer_test.fused_scale_shift: reference}) as safety:
        torch.ops.lora_trainer_test.fused_scale_shift(x, scale).sum().backward()
    assert safety.rerouted == 1
    torch.testing.assert_close(x.grad, (1 + scale).expand(3, 4))
    torch.ops.lora_trainer_test.fused_scale_shift(x, scale)  # outside a session: the kernel itself
    assert safety.rerouted == 1


def assert_nothing_left():
    assert torch.Tensor.__iadd__ is ORIGINAL_IADD
    assert "__iadd__" not in torch.Tensor.__dict__
    assert not augmented_patch_installed()
    assert active_session() is None
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_nothing_is_left_after_finish_error_and_cancel():
    _, model = twins()
    gradients(model, inputs(), True, AutogradSafety())
    assert_nothing_left()
    for stop in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(stop)):
            with AutogradSafety():
                assert torch.Tensor.__iadd__ is not ORIGINAL_IADD
                raise stop
        assert_nothing_left()


def test_inference_after_the_run_writes_in_place_again():
    _, model = twins()
    gradients(model, inputs(), True, AutogradSafety())
    x = torch.randn(3, requires_grad=True) * 1.0
    same = x
    x += torch.ones(3, requires_grad=True)
    assert x is same and x.grad_fn.name() == "AddBackward0"


def test_other_threads_keep_in_place_augmented_assignment():
    ready, done = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        ready.wait(5)
        x = torch.zeros(3, requires_grad=True) * 1.0
        before = x
        x += torch.ones(3, requires_grad=True)
        seen["same_object"] = x is before
        seen["values"] = before.detach().clone()
        seen["session"] = active_session()
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with AutogradSafety() as safety:
        assert torch.Tensor.__iadd__ is not ORIGINAL_IADD  # patched process-wide...
        ready.set()
        assert done.wait(5)
        y = torch.zeros(3, requires_grad=True) * 1.0
        before = y
        y += torch.ones(3, requires_grad=True)
        assert y is not before  # ...out of place only in this thread
    thread.join()
    assert seen == {"same_object": True, "values": seen["values"], "session": None}
    torch.testing.assert_close(seen["values"], torch.ones(3))
    assert safety.out_of_place == 1


def test_nested_sessions_keep_the_patch_until_the_last_one_ends():
    with AutogradSafety():
        with AutogradSafety():
            assert augmented_patch_installed()
        assert augmented_patch_installed() and torch.Tensor.__iadd__ is not ORIGINAL_IADD
    assert_nothing_left()


def in_place_block_forward(self, tokens, emb, context):
    tokens = tokens + emb[:, None, :]
    tokens += self.attn(self.norm1(tokens), context)
    tokens.add_(self.ff(self.norm2(tokens)))  # into the tensor norm2 saved
    return tokens


@pytest.mark.parametrize("checkpointing,policy", [(False, "auto"), (True, "all_blocks"), (True, "auto")])
def test_training_loop_through_in_place_blocks_equals_the_out_of_place_model(monkeypatch, checkpointing, policy):
    data = toy_dataset(count=4, size=16)
    config = TrainConfig(steps=3, batch_size=2, learning_rate=1e-2, training_dtype="fp32",
                         adapter=AdapterSpec(rank=4, alpha=4), targets=TargetSpec(preset="all"),
                         gradient_checkpointing=checkpointing, checkpoint_policy=policy)
    expected = train(make_toy_denoiser("eps", seed=3), data, config).adapter_set.to_state_dict()
    monkeypatch.setattr(ToyBlock, "forward", in_place_block_forward)
    got = train(make_toy_denoiser("eps", seed=3), data, config).adapter_set.to_state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert_nothing_left()
