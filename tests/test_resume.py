import json

import pytest
import torch
from lora_core.toy import toy_dataset
from safetensors.torch import save_file

from lora_core.adapters import AdapterSpec
from lora_core.errors import UserInputError
from lora_core.lorafile.files import load_lora, save_lora, to_kohya
from lora_core.lorafile.resume import (
    load_optimizer_state,
    resume_from_file,
    save_checkpoint,
    sidecar_path,
    steps_done,
)
from lora_core.adapters.targets import TargetSpec
from lora_core.toy import make_toy_denoiser
from lora_core.training.loop import TrainCallbacks, TrainConfig, train


def config(**overrides) -> TrainConfig:
    settings = dict(
        steps=6,
        batch_size=2,
        learning_rate=1e-2,
        training_dtype="fp32",
        adapter=AdapterSpec(rank=4, alpha=4.0),
        targets=TargetSpec(preset="attention_mlp", train_norms_and_biases=True),
        gradient_checkpointing=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def tensors(result) -> dict[str, torch.Tensor]:
    return result.adapter_set.to_state_dict()


@pytest.mark.parametrize("optimizer, bypass", [("adamw", False), ("adamw", True), ("rmsprop", False)])
def test_n_then_m_steps_equal_n_plus_m_bit_for_bit(tmp_path, optimizer, bypass):
    data = toy_dataset(6)  # 6 samples, batch 2 x accumulation 2: steps straddle epochs
    settings = dict(optimizer=optimizer, bypass=bypass, grad_accumulation_steps=2, weight_decay=0.01)
    whole = train(make_toy_denoiser("flow"), data, config(steps=7, **settings))

    first = train(make_toy_denoiser("flow"), data, config(steps=4, **settings))
    path = save_checkpoint(tmp_path / "run.safetensors", first.adapter_set, config(steps=4, **settings), first.total_steps,
                           "diffusion_model.", first.optimizer_state, first.loss)
    denoiser = make_toy_denoiser("flow")
    resumed = resume_from_file(path, denoiser, config(steps=3, **settings))
    assert resumed.steps_done == 4 and resumed.optimizer_state is not None
    rest = train(denoiser, data, config(steps=3, **settings), resume=resumed)

    assert rest.total_steps == 7 and rest.steps == [5, 6, 7]
    assert rest.loss == whole.loss[4:]
    assert tensors(rest).keys() == tensors(whole).keys()
    for key, value in tensors(whole).items():
        assert torch.equal(value, tensors(rest)[key]), key
    assert any(key.endswith(".diff_b") for key in tensors(whole)) and any(key.endswith(".diff") for key in tensors(whole))


def test_without_the_sidecar_training_continues_with_a_fresh_optimizer(tmp_path):
    data = toy_dataset(4)
    first = train(make_toy_denoiser("eps"), data, config(steps=3))
    path = save_checkpoint(tmp_path / "no_state.safetensors", first.adapter_set, config(steps=3), 3, "diffusion_model.")
    assert not sidecar_path(path).exists()
    resumed = resume_from_file(path, make_toy_denoiser("eps"), config())
    assert resumed.steps_done == 3 and resumed.optimizer_state is None
    for key, value in tensors(first).items():
        assert torch.equal(value, resumed.adapter_set.to_state_dict()[key])


def test_sidecar_round_trip_keeps_every_tensor_and_the_layout(tmp_path):
    result = train(make_toy_denoiser("eps"), toy_dataset(4), config(steps=2, loraplus_ratio=2.0))
    path = save_checkpoint(tmp_path / "a.safetensors", result.adapter_set, config(steps=2, loraplus_ratio=2.0), 2,
                           "diffusion_model.", result.optimizer_state)
    assert sidecar_path(path).name == "a.optim"
    loaded, name = load_optimizer_state(sidecar_path(path))
    assert name == "adamw"
    saved = result.optimizer_state
    assert [g["param_names"] for g in loaded["param_groups"]] == [g["param_names"] for g in saved["param_groups"]]
    assert loaded["param_groups"][0]["betas"] == saved["param_groups"][0]["betas"]
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(loaded["state"][index][key], value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_step_count_from_metadata_then_file_name():
    assert steps_done({"steps": "120", "ss_steps": "5"}) == 120
    assert steps_done({"ss_steps": "40"}) == 40
    assert steps_done({}, "my_lora_300_steps_00001_.safetensors") == 300
    assert steps_done({}, "plain.safetensors") == 0


def test_kohya_named_and_comfyui_trainer_files_resume(tmp_path):
    denoiser = make_toy_denoiser("eps")
    result = train(denoiser, toy_dataset(4), config(steps=2))
    state = result.adapter_set.to_state_dict()
    save_lora(tmp_path / "k.safetensors", to_kohya(state), {"ss_steps": "2"})
    kohya = resume_from_file(tmp_path / "k.safetensors", denoiser, config())
    # ComfyUI's trainer writes no metadata; its file names carry the step count.
    save_file(state, str(tmp_path / "lora_2_steps_00001_.safetensors"))
    comfy = resume_from_file(tmp_path / "lora_2_steps_00001_.safetensors", denoiser, config())
    for point in (kohya, comfy):
        assert point.steps_done == 2
        for key, value in state.items():
            assert torch.equal(point.adapter_set.to_state_dict()[key], value)
        more = train(denoiser, toy_dataset(4), config(steps=1), resume=point)
        assert more.total_steps == 3


@pytest.mark.parametrize(
    "changed, word",
    [
        ({"adapter": AdapterSpec(algorithm="loha", rank=4, alpha=4.0)}, "algorithm"),
        ({"adapter": AdapterSpec(rank=8, alpha=4.0)}, "rank"),
        ({"adapter": AdapterSpec(rank=4, alpha=1.0)}, "alpha"),
        ({"optimizer": "sgd"}, "optimizer"),
    ],
)
def test_contradicting_settings_are_refused(tmp_path, changed, word):
    result = train(make_toy_denoiser("eps"), toy_dataset(4), config(steps=1))
    path = save_checkpoint(tmp_path / "x.safetensors", result.adapter_set, config(steps=1), 1, "diffusion_model.",
                           result.optimizer_state)
    with pytest.raises(UserInputError, match=word):
        resume_from_file(path, make_toy_denoiser("eps"), config(**changed))


def test_a_lora_for_another_model_is_refused(tmp_path):
    from lora_core.toy import ToyNetConfig

    result = train(make_toy_denoiser("eps"), toy_dataset(4), config(steps=1))
    path = save_checkpoint(tmp_path / "x.safetensors", result.adapter_set, config(steps=1), 1, "diffusion_model.")
    wider = make_toy_denoiser("eps", config=ToyNetConfig(width=32))
    with pytest.raises(UserInputError):
        resume_from_file(path, wider, config())


def test_checkpoints_from_the_callback_resume(tmp_path):
    data = toy_dataset(4)
    settings = config(steps=4, save_every_steps=2)
    written = []

    def on_checkpoint(step, adapter_set, optimizer_state):
        written.append(save_checkpoint(tmp_path / f"ckpt_{step}.safetensors", adapter_set, settings, step,
                                       "diffusion_model.", optimizer_state))

    whole = train(make_toy_denoiser("v"), data, settings, TrainCallbacks(on_checkpoint=on_checkpoint))
    assert [p.name for p in written] == ["ckpt_2.safetensors"]
    metadata = load_lora(written[0])[1]
    assert metadata["steps"] == "2" and json.loads(metadata["training_settings"])["save_every_steps"] == 2
    denoiser = make_toy_denoiser("v")
    rest = train(denoiser, data, config(steps=2), resume=resume_from_file(written[0], denoiser, config(steps=2)))
    for key, value in tensors(whole).items():
        assert torch.equal(value, tensors(rest)[key]), key
