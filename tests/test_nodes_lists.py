"""Node-side helpers that need no ComfyUI: list shapes, file names, throttling, the LORA_MODEL type."""

import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def _pack():
    """The repository as the package ComfyUI imports it as (its nodes import lora_core relatively)."""
    name = "lora_trainer_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.lists"), importlib.import_module(f"{name}.lora_core.lorafile.lora_model")


lists, lora_model = _pack()


def _cond(tag: float):
    return [[torch.full((1, 3, 2), tag), {"pooled_output": torch.full((1, 2), tag)}]]


def test_root_package_registers_nothing_outside_comfyui():
    root = sys.modules["lora_trainer_pack_under_test"]
    assert root.__all__ == []
    assert not hasattr(root, "NODE_CLASS_MAPPINGS")
    assert not any(m == "comfy" or m.startswith(("comfy.", "comfy_api", "folder_paths")) for m in sys.modules)


def test_single_unwraps_widget_lists():
    assert lists.single([5]) == 5
    assert lists.single(5) == 5
    assert lists.single([]) is None


def test_training_samples_per_image_latents_and_conditioning():
    latents = [{"samples": torch.full((1, 4, 2, 2), float(i))} for i in range(3)]
    conds = [_cond(i) for i in range(3)]
    samples, per_sample = lists.training_samples(latents, conds)
    assert [s.shape for s in samples] == [torch.Size([4, 2, 2])] * 3
    assert [s[0, 0, 0].item() for s in samples] == [0.0, 1.0, 2.0]
    assert [c[0][0][0, 0, 0].item() for c in per_sample] == [0.0, 1.0, 2.0]


def test_training_samples_bucketed_batches_keep_alignment():
    # Resolution Bucket output: one [B, ...] latent per bucket and a list of B entries.
    bucket_a = {"samples": torch.stack([torch.full((4, 2, 2), v) for v in (0.0, 1.0)])}
    bucket_b = {"samples": torch.full((1, 4, 3, 2), 2.0)}
    conds = [_cond(0) + _cond(1), _cond(2)]
    samples, per_sample = lists.training_samples([bucket_a, bucket_b], conds)
    assert [s[0, 0, 0].item() for s in samples] == [0.0, 1.0, 2.0]
    assert [lists.conditioning_entry(c)[0][0, 0, 0].item() for c in per_sample] == [0.0, 1.0, 2.0]


def test_training_samples_one_conditioning_for_all():
    latents = [{"samples": torch.zeros(1, 4, 2, 2)} for _ in range(3)]
    samples, per_sample = lists.training_samples(latents, [_cond(7)])
    assert len(samples) == 3 and len(per_sample) == 1


def test_training_samples_one_batched_latent_with_a_conditioning_per_image():
    # As ComfyUI's trainer takes it: one LATENT of 3 images, one conditioning per image, by position.
    batch = {"samples": torch.stack([torch.full((4, 2, 2), float(i)) for i in range(3)])}
    samples, per_sample = lists.training_samples([batch], [_cond(i) for i in range(3)])
    assert [s.shape for s in samples] == [torch.Size([4, 2, 2])] * 3
    assert [s[0, 0, 0].item() for s in samples] == [0.0, 1.0, 2.0]
    assert [lists.conditioning_entry(c)[0][0, 0, 0].item() for c in per_sample] == [0.0, 1.0, 2.0]


def test_training_samples_count_mismatch_is_a_user_error():
    latents = [{"samples": torch.zeros(1, 4, 2, 2)} for _ in range(3)]
    with pytest.raises(ValueError, match="3 latents but 2 conditionings"):
        lists.training_samples(latents, [_cond(0), _cond(1)])
    with pytest.raises(ValueError, match="empty"):
        lists.training_samples([], [_cond(0)])


def test_conditioning_entry_accepts_one_entry_and_refuses_combined():
    entry = _cond(1)[0]
    assert lists.conditioning_entry(entry) is entry
    assert lists.conditioning_entry([entry]) is entry
    with pytest.raises(ValueError, match="Conditioning \\(Concat\\)"):
        lists.conditioning_entry([entry, entry])
    with pytest.raises(ValueError, match="not conditioning"):
        lists.conditioning_entry("text")


def test_dedupe_by_identity_keeps_repeats_shared():
    a, b = torch.zeros(1), torch.zeros(1)
    distinct, index = lists.dedupe_by_identity([a, a, b, a])
    assert len(distinct) == 2 and distinct[0] is a and distinct[1] is b
    assert index == [0, 0, 1, 0]


def test_file_counter_never_reuses_a_number():
    existing = ["lora_00001_.safetensors", "lora_200_steps_00007_.safetensors", "lora_v2_00009_.safetensors",
                "lora_200_steps_00007_.optim", "other_00099_.safetensors"]
    assert lists.next_counter("lora", existing) == 8
    assert lists.next_counter("fresh", existing) == 1
    assert lists.lora_file_name("lora", 200, 8) == "lora_200_steps_00008_.safetensors"
    assert lists.lora_file_name("lora", None, 3) == "lora_00003_.safetensors"


def test_loss_summary_skips_non_finite_and_handles_one_value():
    assert lists.loss_summary([]) == {}
    one = lists.loss_summary([0.5])
    assert one["first"] == one["last"] == one["min"] == 0.5
    summary = lists.loss_summary([1.0, float("nan"), 0.25])
    assert summary["min"] == 0.25 and summary["count"] == 2


def test_throttle_first_last_and_time_based():
    throttle = lists.Throttle(every_steps=10, every_seconds=2.0)
    assert throttle.due(1, 100, now=0.0)          # first
    assert not throttle.due(2, 100, now=0.1)
    assert not throttle.due(11, 100, now=0.2)     # 10 steps but too soon
    assert throttle.due(12, 100, now=0.6)         # 10+ steps and a quarter of the interval
    assert throttle.due(13, 100, now=2.7)         # the interval
    assert throttle.due(100, 100, now=2.8)        # last


def test_lora_model_is_a_plain_tensor_dict_with_riders():
    tensors = {"diffusion_model.a.lora_up.weight": torch.zeros(2, 1), "diffusion_model.a.alpha": torch.tensor(1.0)}
    lora = lora_model.LoraModel(tensors, {"steps": "5"}, {"state": {}, "param_groups": []})
    assert isinstance(lora, dict) and dict(lora) == tensors
    assert lora.metadata == {"steps": "5"} and lora.optimizer_state == {"state": {}, "param_groups": []}
    copy = pickle.loads(pickle.dumps(lora))
    assert isinstance(copy, lora_model.LoraModel) and copy.metadata == {"steps": "5"}
    assert set(copy) == set(tensors)


def test_as_lora_model_accepts_core_dicts_and_refuses_other_values():
    plain = {"diffusion_model.a.lora_up.weight": torch.zeros(2, 1)}
    wrapped = lora_model.as_lora_model(plain)
    assert isinstance(wrapped, lora_model.LoraModel) and wrapped.metadata == {} and wrapped.optimizer_state is None
    assert lora_model.as_lora_model(wrapped) is wrapped
    with pytest.raises(ValueError, match="not LoRA weights"):
        lora_model.as_lora_model([1, 2])
    with pytest.raises(ValueError, match="non-tensor"):
        lora_model.as_lora_model({"x": 1})
