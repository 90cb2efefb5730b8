"""Test-side helpers: load an example as an API prompt with test-sized overrides, read outputs."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from comfy_server import CHECKPOINT, CLIP_FILE, REPO_ROOT, UNET_FILE, VAE_FILE
from workflow_api import convert

P = "LoRATrainer_"
EXAMPLES_DIR = REPO_ROOT / "example_workflows"
TEST_STEPS = 3
TEST_SIZE = 64

# What every example gets in the tests: the tiny model files, 64 px images, 3 training steps, 2 sampling steps.
TEST_OVERRIDES = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "UNETLoader": {"unet_name": UNET_FILE},
    "CLIPLoader": {"clip_name": CLIP_FILE},
    "VAELoader": {"vae_name": VAE_FILE},
    P + "LoadImageDataset": {"width": TEST_SIZE, "height": TEST_SIZE},
    P + "LoadImageTextDataset": {"width": TEST_SIZE, "height": TEST_SIZE},
    P + "ResolutionBucket": {"resolution": TEST_SIZE},
    P + "TrainLoRA": {"steps": TEST_STEPS},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": TEST_SIZE, "height": TEST_SIZE},
}


def example_prompt(name: str, object_info: dict, **per_class: dict) -> dict:
    """The example `name` as an API prompt with TEST_OVERRIDES, then `per_class` overrides
    (keyword = node class id without our prefix, or a core class id)."""
    workflow = json.loads((EXAMPLES_DIR / f"{name}.json").read_text())
    prompt = convert(workflow, object_info)
    for node in prompt.values():
        node["inputs"].update(TEST_OVERRIDES.get(node["class_type"], {}))
    for key, values in per_class.items():
        class_type = key if key in object_info else P + key
        matched = [n for n in prompt.values() if n["class_type"] == class_type]
        assert matched, f"{name} has no {class_type} node"
        for node in matched:
            node["inputs"].update(values)
    return prompt


def node_id(prompt: dict, class_type: str) -> str:
    class_type = class_type if class_type in {n["class_type"] for n in prompt.values()} else P + class_type
    ids = [k for k, n in prompt.items() if n["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type}, found {ids}"
    return ids[0]


def saved_lora_name(result, prompt: dict) -> str:
    """The loras/ file name Save LoRA Weights reported (its UI text 'saved loras/<name>')."""
    ui = result.outputs[node_id(prompt, "SaveLoRAWeights")]
    texts = [t for t in ui.get("text", []) if isinstance(t, str)]
    assert texts and texts[0].startswith("saved loras/"), ui
    return texts[0][len("saved loras/"):]


def saved_files(result, node: str, key: str = "images") -> list[dict]:
    return result.outputs.get(node, {}).get(key, [])


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (float ones as float32 numpy arrays) and metadata of a .safetensors / .latent file,
    without torch or safetensors in the test process."""
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__", {}) or {}
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        buffer = raw[8 + length + start: 8 + length + end]
        if info["dtype"] == "BF16":
            array = (np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in dtypes:
            array = np.frombuffer(buffer, dtype=dtypes[info["dtype"]])
        else:
            continue
        tensors[name] = array.reshape(info["shape"]).astype(np.float32) if array.dtype.kind == "f" else \
            array.reshape(info["shape"])
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A float32 .safetensors file written with numpy only (for hand-made bad inputs)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    return path


def core_sampling_prompt(model_source=("1", 0), seed=7, steps=2, prefix="latents/harness"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks toy"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": list(model_source), "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
    }


def api_node(object_info: dict, class_type: str, **inputs) -> dict:
    """An API-prompt node with every widget at its default (as the editor would send it), then `inputs`."""
    info = object_info[class_type]
    values = {}
    for kind in ("required", "optional"):
        for name, entry in info["input"].get(kind, {}).items():
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if "default" in options:
                values[name] = options["default"]
    values.update(inputs)
    return {"class_type": class_type, "inputs": values}
