"""Bad inputs come back as node errors with a clear message, and the server keeps serving."""
import numpy as np
import pytest

from comfy_server import PromptRejected
from it_helpers import core_sampling_prompt, example_prompt, write_safetensors
from it_images import write_images


def run_expecting_error(comfy, prompt) -> str:
    """The message of the node error (validation rejection or execution error) a prompt produces."""
    try:
        result = comfy.run(prompt)
    except PromptRejected as rejected:
        messages = [f"{e.get('message')}: {e.get('details')}" for node in rejected.node_errors.values()
                    for e in node.get("errors", [])]
        return "\n".join(messages) or str(rejected)
    assert result.status == "error", f"expected a node error, got {result.status}"
    error = result.error
    assert error is not None and error.get("exception_message"), result.messages
    assert comfy.alive()
    return error["exception_message"]


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.object_info()


def test_empty_folder(comfy, object_info):
    (comfy.input_dir / "it_empty").mkdir(exist_ok=True)
    message = run_expecting_error(comfy, example_prompt(
        "lora_01_images_one_caption", comfy.object_info(), LoadImageDataset={"folder": "it_empty"}))
    assert "it_empty" in message and "image" in message.lower(), message


def test_missing_captions_with_error_policy(comfy, object_info):
    write_images(comfy.input_dir / "it_partial_captions", [(64, 64)] * 3, captions=1)
    message = run_expecting_error(comfy, example_prompt(
        "lora_02_captioned_folder", comfy.object_info(),
        LoadImageTextDataset={"folder": "it_partial_captions", "missing_captions": "error"}))
    assert "img_01" in message and "caption" in message.lower(), message


def test_folder_outside_input_is_refused(comfy, object_info):
    message = run_expecting_error(comfy, example_prompt(
        "lora_01_images_one_caption", object_info, LoadImageDataset={"folder": "../models"}))
    assert "../models" in message or "outside" in message.lower() or "not in" in message.lower(), message


def test_resume_from_a_file_that_is_not_a_lora(comfy, object_info):
    write_safetensors(comfy.models_dir / "loras" / "it_not_a_lora.safetensors",
                      {"some.weight": np.zeros((4, 4), np.float32)})
    write_images(comfy.input_dir / "it_resume_bad", [(64, 64)] * 2, captions=False)
    message = run_expecting_error(comfy, example_prompt(
        "lora_05_continue_training", comfy.object_info(), LoadImageDataset={"folder": "it_resume_bad"},
        TrainLoRA={"existing_lora": "it_not_a_lora.safetensors"}))
    assert "it_not_a_lora" in message or "some.weight" in message, message


def test_resume_from_a_lora_of_the_wrong_shape(comfy, object_info):
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    write_safetensors(comfy.models_dir / "loras" / "it_wrong_shape.safetensors", {
        f"{key}.lora_up.weight": np.zeros((320, 4), np.float32),
        f"{key}.lora_down.weight": np.zeros((4, 999), np.float32),
        f"{key}.alpha": np.array(4.0, np.float32)})
    write_images(comfy.input_dir / "it_resume_bad", [(64, 64)] * 2, captions=False)
    message = run_expecting_error(comfy, example_prompt(
        "lora_05_continue_training", comfy.object_info(), LoadImageDataset={"folder": "it_resume_bad"},
        TrainLoRA={"existing_lora": "it_wrong_shape.safetensors"}))
    assert "it_wrong_shape" in message or "shape" in message.lower(), message


def test_server_still_serves_after_errors(comfy):
    result = comfy.run_ok(core_sampling_prompt(seed=9, prefix="latents/after_errors"))
    assert result.outputs
