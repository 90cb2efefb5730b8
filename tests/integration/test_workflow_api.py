"""Unit tests of the UI -> API workflow converter (no ComfyUI needed: node definitions are inlined)."""
import pytest

from workflow_api import ConversionError, convert, set_inputs, widget_inputs

# Excerpts of /object_info for the core nodes used below, in the server's own shape.
OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
                               "input_order": {"required": ["ckpt_name"]}, "display_name": "Load Checkpoint"},
    "LoraLoader": {"input": {"required": {
        "model": ["MODEL", {}], "clip": ["CLIP", {}], "lora_name": [["x.safetensors"], {}],
        "strength_model": ["FLOAT", {"default": 1.0}], "strength_clip": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "clip", "lora_name", "strength_model", "strength_clip"]}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
                       "input_order": {"required": ["text", "clip"]}},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}],
                                                "batch_size": ["INT", {}]}}},
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
        "cfg": ["FLOAT", {}], "sampler_name": [["euler", "dpmpp_2m"], {}], "scheduler": [["normal", "karras"], {}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {}]}}},
    "SaveLatent": {"input": {"required": {"samples": ["LATENT", {}], "filename_prefix": ["STRING", {}]}}},
    "LoadImage": {"input": {"required": {"image": [["cat.png"], {"image_upload": True}]}}},
    "Forced": {"input": {"required": {"n": ["INT", {"forceInput": True}], "m": ["INT", {}]},
                         "optional": {"opt": ["COMBO", {"options": ["p", "q"]}]}}},
}


def link(link_id, origin, origin_slot, target, target_slot, kind):
    return [link_id, origin, origin_slot, target, target_slot, kind]


def ui_workflow():
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP", "type": "CLIP", "links": [2, 3, 12]},
                     {"name": "VAE", "type": "VAE", "links": []}],
         "widgets_values": ["b.safetensors"]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "MODEL", "links": [11]}]},
        {"id": 10, "type": "LoraLoader", "mode": 4,
         "inputs": [{"name": "model", "type": "MODEL", "link": 11}, {"name": "clip", "type": "CLIP", "link": 12}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [4]}, {"name": "CLIP", "type": "CLIP", "links": []}],
         "widgets_values": ["x.safetensors", 1.0, 1.0]},
        {"id": 3, "type": "CLIPTextEncode", "mode": 0, "title": "Positive",
         "inputs": [{"name": "clip", "type": "CLIP", "link": 2},
                    {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 9}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5]}], "widgets_values": ["ignored"]},
        {"id": 4, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}], "widgets_values": ["blurry"]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}], "widgets_values": [64, 96, 1]},
        {"id": 6, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 4}, {"name": "positive", "type": "CONDITIONING", "link": 5},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 7},
                    {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [8, 13]}],
         "widgets_values": [42, "randomize", 5, 2.5, "dpmpp_2m", "karras", 0.75]},
        {"id": 7, "type": "SaveLatent", "mode": 0, "inputs": [{"name": "samples", "type": "LATENT", "link": 8}],
         "outputs": [], "widgets_values": ["latents/x"]},
        {"id": 8, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "STRING", "type": "STRING", "links": [9], "widget": {"name": "text"}}],
         "widgets_values": ["a photo of sks dog"]},
        {"id": 9, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["read me"]},
        {"id": 11, "type": "SaveLatent", "mode": 2, "inputs": [{"name": "samples", "type": "LATENT", "link": 13}],
         "outputs": [], "widgets_values": ["muted"]},
    ]
    links = [link(1, 1, 0, 2, 0, "MODEL"), link(2, 1, 1, 3, 0, "CLIP"), link(3, 1, 1, 4, 0, "CLIP"),
             link(4, 10, 0, 6, 0, "MODEL"), link(5, 3, 0, 6, 1, "CONDITIONING"), link(6, 4, 0, 6, 2, "CONDITIONING"),
             link(7, 5, 0, 6, 3, "LATENT"), link(8, 6, 0, 7, 0, "LATENT"), link(9, 8, 0, 3, 1, "STRING"),
             link(11, 2, 0, 10, 0, "MODEL"), link(12, 1, 1, 10, 1, "CLIP"), link(13, 6, 0, 11, 0, "LATENT")]
    return {"last_node_id": 11, "last_link_id": 13, "nodes": nodes, "links": links, "version": 0.4}


def test_converts_widgets_links_reroutes_primitives_bypass_and_mute():
    prompt = convert(ui_workflow(), OBJECT_INFO)
    assert set(prompt) == {"1", "3", "4", "5", "6", "7"}
    assert prompt["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    assert prompt["3"] == {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
                           "inputs": {"text": "a photo of sks dog", "clip": ["1", 1]}}
    assert prompt["4"]["inputs"] == {"text": "blurry", "clip": ["1", 1]}
    assert prompt["5"]["inputs"] == {"width": 64, "height": 96, "batch_size": 1}
    # seed's "randomize" is skipped; the bypassed LoraLoader and the reroute lead back to the checkpoint
    assert prompt["6"]["inputs"] == {"model": ["1", 0], "seed": 42, "steps": 5, "cfg": 2.5, "sampler_name": "dpmpp_2m",
                                     "scheduler": "karras", "positive": ["3", 0], "negative": ["4", 0],
                                     "latent_image": ["5", 0], "denoise": 0.75}
    assert prompt["7"]["inputs"] == {"samples": ["6", 0], "filename_prefix": "latents/x"}


def test_widget_order_skips_forced_inputs_and_counts_upload_buttons():
    assert widget_inputs(OBJECT_INFO["Forced"]) == [("m", 1), ("opt", 1)]
    assert widget_inputs(OBJECT_INFO["LoadImage"]) == [("image", 2)]
    assert widget_inputs(OBJECT_INFO["KSampler"])[0] == ("seed", 2)


def test_dict_widget_values_and_missing_trailing_values():
    wf = {"nodes": [{"id": 1, "type": "Forced", "mode": 0, "inputs": [], "outputs": [], "widgets_values": {"m": 3}},
                    {"id": 2, "type": "EmptyLatentImage", "mode": 0, "inputs": [], "outputs": [],
                     "widgets_values": [64]}], "links": []}
    prompt = convert(wf, OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"m": 3}
    assert prompt["2"]["inputs"] == {"width": 64}


def test_unknown_node_and_subgraph_are_clear_errors():
    wf = {"nodes": [{"id": 1, "type": "NoSuchNode", "mode": 0, "inputs": [], "outputs": []}], "links": []}
    with pytest.raises(ConversionError, match="NoSuchNode"):
        convert(wf, OBJECT_INFO)
    with pytest.raises(ConversionError, match="subgraphs"):
        convert({"nodes": [], "links": [], "definitions": {"subgraphs": [{}]}}, OBJECT_INFO)


def test_set_inputs_returns_changed_copy():
    prompt = convert(ui_workflow(), OBJECT_INFO)
    changed = set_inputs(prompt, "KSampler", steps=2)
    assert changed["6"]["inputs"]["steps"] == 2 and prompt["6"]["inputs"]["steps"] == 5
    with pytest.raises(KeyError):
        set_inputs(prompt, "VAEDecode", x=1)
