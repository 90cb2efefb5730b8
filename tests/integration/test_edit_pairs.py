"""Edit pairs end to end in a real ComfyUI, on tiny Qwen-Image-Edit (one and two controls) and Flux.1 Kontext
models built with ComfyUI's own classes (see edit_pairs_check.py, run in ComfyUI's Python in a child process).

What must hold for each family: the folder pairs load; Make Training Dataset puts one reference latent per control
into each sample's conditioning (Qwen: the prompt also sees the controls); Save / Load Training Dataset and
Resolution Bucket keep them; the first step's loss changes when only the controls change (they reach the model);
Train LoRA trains, also with every block recomputed; ComfyUI's core LoRA loader applies every key; one step's
adapter gradient along a random direction matches float64 central finite differences and the checkpointed
gradient equals the plain one; mixed reference sizes in one batch run one at a time with the same result; and the
bad inputs (a model of another family, a model that reads no reference images, too many controls) are refused
with messages naming the family.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FAMILIES = ("qwen_edit", "qwen_edit_plus", "kontext")
LABELS = {"qwen_edit": "Qwen-Image-Edit", "qwen_edit_plus": "Qwen-Image-Edit-2509 / 2511", "kontext": "Flux.1 Kontext"}


def _comfy() -> tuple[str, str]:
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip("COMFYUI_ROOT is not set: these checks need a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(root) / "venv" / "bin" / "python")
    return root, python if Path(python).exists() else sys.executable


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root, python = _comfy()
    work = tmp_path_factory.mktemp("edit_pairs")
    done = subprocess.run([python, str(HERE / "edit_pairs_check.py"), str(ROOT), str(work), *FAMILIES, "example"],
                          capture_output=True, text=True, timeout=1800, cwd=root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, f"check failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("family", FAMILIES)
def test_pairs_become_reference_latents_that_survive_saving_and_buckets(results, family):
    r = results[family]
    controls = 2 if family == "qwen_edit_plus" else 1
    assert r["pairs"][0] == 3 and all(shape[0] == controls for shape in r["pairs"][1])
    assert len(r["ref_shapes"]) == controls
    assert r["ref_shapes"][0][1] == 16 and r["ref_shapes"][0][-2:] == r["latent_shape"][-2:]   # match_target
    assert r["saved_refs_equal"] is True
    assert [tuple(s) for s in r["bucket_controls"]] == [(controls, 32, 32, 3)] * 3
    if family.startswith("qwen"):   # Qwen2.5-VL sees the control: the prompt's conditioning depends on it
        assert r["texts_differ_by_control"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_latents_reach_the_model(results, family):
    r = results[family]
    assert abs(r["loss_same_controls"] - r["loss_other_controls"]) > 1e-5, r


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_and_loads_in_comfyui_core_loader(results, family):
    r = results[family]
    assert r["trained_steps"] == 3 and all(v == v for v in r["loss"])   # finite
    assert isinstance(r["all_blocks_loss"], list) and len(r["all_blocks_loss"]) == 2, r["all_blocks_loss"]
    assert r["unloaded_keys"] == [] and r["patched"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_matches_float64_finite_differences(results, family):
    for preset in ("grad", "grad_attention_mlp"):   # target presets all (the default) and attention_mlp
        g = results[family][preset]
        assert g["relative_error"] < 1e-4, (preset, g)
        assert g["checkpoint_difference"] < 1e-6, (preset, g)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_reference_sizes_run_one_at_a_time(results, family):
    m = results[family]["mixed_batch"]
    assert m["same_size_groups"] == 1 and m["mixed_groups"] == 2 and m["max_difference"] < 1e-5, m


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_name_the_family(results, family):
    e = results[family]["errors"]
    label = LABELS[family]
    assert f"made for {label}" in e["model_of_other_family"] and "SD15" in e["model_of_other_family"]
    assert e["model_without_references"].startswith("SD15 takes no reference images")
    assert e["wrong_text_encoder"].startswith(f"edit_model is {label}, but the text encoder connected is a SD1Tokenizer")
    controls = 2 if family == "qwen_edit_plus" else 1
    assert f"has {4 * controls} control images, but {label} takes" in e["too_many_controls"], e["too_many_controls"]


def test_example_runs_in_process(results):
    """lora_09_edit_pairs as shipped (test sizes: 32 px, 2 steps, controls at the target's size), its loaders
    replaced by the tiny Qwen-Image-Edit model, VAE and stand-in text encoder; the LoRA file it saves loads in
    ComfyUI's core loader with every key applied."""
    r = results["example"]
    assert r["nodes"] == ["LoRATrainer_LoadEditPairsDataset", "LoRATrainer_MakeTrainingDataset",
                          "LoRATrainer_MemorySettings", "LoRATrainer_PlotLossGraph", "LoRATrainer_SaveLoRAWeights",
                          "LoRATrainer_TrainLoRA"]
    assert r["saved"] == ["my_edit_lora_2_steps_00001_.safetensors"]
    assert r["unloaded_keys"] == [] and r["patched"] > 0


# ---- bad input through a real server: lora_09_edit_pairs as shipped, with the tiny SD1.5 files ---------

def _pairs(folder: Path, names_sizes: list[tuple[str, tuple[int, int]]]) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(names_sizes):
        Image.new("RGB", size, (40 * i % 256, 90, 200)).save(folder / name)


def _edit_error(comfy, folder: str, **per_class) -> str:
    from it_helpers import example_prompt
    from test_errors import run_expecting_error
    prompt = example_prompt("lora_09_edit_pairs", comfy.object_info(), CLIPLoader={"type": "stable_diffusion"},
                            LoadEditPairsDataset={"folder": folder, "resize": "none"}, **per_class)
    return run_expecting_error(comfy, prompt)


def test_missing_pairs_are_named(comfy):
    _pairs(comfy.input_dir / "it_pairs_missing", [("a.png", (64, 64)), ("a_control.png", (64, 64)),
                                                  ("b.png", (64, 64)), ("c_control.png", (64, 64))])
    message = _edit_error(comfy, "it_pairs_missing")
    assert "it_pairs_missing/b.png" in message and "no control image" in message, message
    assert "it_pairs_missing/c_control.png" in message and "no target image" in message, message
    assert "a.png" not in message.replace("_control", ""), message


def test_very_different_aspect_ratios_are_named(comfy):
    _pairs(comfy.input_dir / "it_pairs_aspect", [("wide.png", (128, 64)), ("wide_control.png", (64, 128))])
    message = _edit_error(comfy, "it_pairs_aspect")
    assert "wide.png 128x64 vs it_pairs_aspect/wide_control.png 64x128" in message, message


def test_text_encoder_of_another_family_is_refused(comfy):
    _pairs(comfy.input_dir / "it_pairs_ok", [("a.png", (64, 64)), ("a_control.png", (64, 64))])
    message = _edit_error(comfy, "it_pairs_ok")
    assert "edit_model is Qwen-Image-Edit, but the text encoder connected is a SD1Tokenizer" in message, message
