"""Train LoRA's sample files without ComfyUI: prompt texts traced through the API prompt, PNG text,
the grid layout and the pixel conversion Save Image uses."""

import importlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _module():
    name = "lora_trainer_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.sample_files")


files = _module()

API_PROMPT = {
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks toy", "clip": ["1", 1]}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0], "clip": ["1", 1]}},
    "9": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "x"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks toy on grass", "clip": ["1", 1]}},
    "7": {"class_type": "CreateList", "inputs": {"inputs.input10": ["4", 0], "inputs.input0": ["6", 0],
                                                 "inputs.input2": ["4", 0]}},
    "8": {"class_type": "LoRATrainer_TrainLoRA", "inputs": {"sample_prompts": ["7", 0], "sample_negative": ["5", 0]}},
    "10": {"class_type": "LoRATrainer_TrainLoRA", "inputs": {"sample_prompts": ["4", 0]}},
}


def test_prompt_texts_follow_create_list_in_input_order():
    assert files.prompt_texts(API_PROMPT, "8", "sample_prompts", 3) == [
        "sks toy on grass", "a photo of sks toy", "a photo of sks toy"]
    assert files.prompt_texts(API_PROMPT, "10", "sample_prompts", 1) == ["a photo of sks toy"]


def test_prompt_texts_are_none_where_they_cannot_be_told():
    assert files.prompt_texts(API_PROMPT, "8", "sample_negative", 1) == [None]  # text from a linked node
    assert files.prompt_texts(API_PROMPT, "8", "sample_prompts", 2) == [None, None]  # count differs
    assert files.prompt_texts(None, "8", "sample_prompts", 1) == [None]
    assert files.prompt_texts(API_PROMPT, "99", "sample_prompts", 1) == [None]


def test_png_carries_step_seed_prompt_and_the_workflow():
    text = files.sample_png_text(150, 1, 43, "sks toy", {"sampler": "euler", "steps": 20}, {"8": {"x": 1}},
                                 {"workflow": {"nodes": []}})
    data = files.png_bytes(torch.rand(8, 12, 3), text)
    image = Image.open(io.BytesIO(data))
    assert image.size == (12, 8)
    assert image.text["step"] == "150" and image.text["seed"] == "43" and image.text["sample_prompt"] == "sks toy"
    assert json.loads(image.text["lora_trainer_sample"]) == {"step": 150, "prompt_index": 1, "seed": 43,
                                                            "prompt": "sks toy", "sampler": "euler", "steps": 20}
    assert json.loads(image.text["prompt"]) == {"8": {"x": 1}} and json.loads(image.text["workflow"]) == {"nodes": []}
    assert "sample_prompt" not in files.sample_png_text(1, 0, 0, None, {})


def test_grid_rows_are_steps_and_columns_are_prompts():
    rows = [[torch.full((4, 6, 3), step + k / 10) for k in range(3)] for step in range(2)]
    grid = files.grid(rows)
    assert grid.shape == (1, 2 * 4, 3 * 6, 3)
    assert grid[0, 5, 13, 0].item() == rows[1][2][0, 0, 0].item()


def test_pixels_are_truncated_like_save_image():
    image = torch.tensor([[[0.5, 1.2, -0.1], [0.999, 0.0041, 0.25]]])
    expected = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)  # what ComfyUI's Save Image writes
    assert np.array_equal(files.to_uint8(image), expected)


def test_preview_strip_fits_the_chart_width():
    strip = files.row_strip([torch.rand(16, 16, 3), torch.rand(16, 16, 3)], 256)
    assert strip.size == (256, 128)
    both = files.stack_vertically(Image.new("RGB", (256, 100)), strip)
    assert both.size == (256, 228)
