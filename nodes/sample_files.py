"""What Train LoRA's sample images look like on disk and on the IMAGE output, in plain Python.

No ComfyUI import (tested without it): the prompt texts read back from the API prompt, the PNG
text chunks, the PNG bytes and the grid. The drawing itself is in `sampling_glue`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Nodes whose list output is the concatenation of their linked inputs (ComfyUI's Create List).
_LIST_NODES = {"CreateList"}


def prompt_texts(api_prompt: dict | None, node_id: str | None, input_name: str, count: int) -> list[str | None]:
    """The text of each sample prompt, traced from Train LoRA's input back to the CLIP Text Encode
    (or any node with a `text` widget) that made it, through Create List; None where it cannot be
    told (the conditioning came from elsewhere, or the count does not match)."""
    unknown: list[str | None] = [None] * count
    if not api_prompt or node_id is None or str(node_id) not in api_prompt:
        return unknown
    link = api_prompt[str(node_id)].get("inputs", {}).get(input_name)
    texts = _texts_from(api_prompt, link, depth=0)
    return texts if texts is not None and len(texts) == count else unknown


def _texts_from(api_prompt: dict, link: Any, depth: int) -> list[str] | None:
    if depth > 8 or not (isinstance(link, list) and len(link) == 2):
        return None
    node = api_prompt.get(str(link[0]))
    if not isinstance(node, dict):
        return None
    inputs = node.get("inputs", {})
    if node.get("class_type") in _LIST_NODES:
        texts: list[str] = []
        for name in sorted(inputs, key=_natural_key):
            part = _texts_from(api_prompt, inputs[name], depth + 1)
            if part is None:
                return None
            texts += part
        return texts
    text = inputs.get("text")
    if isinstance(text, str):
        return [text]
    return _texts_from(api_prompt, text, depth + 1) if isinstance(text, list) else None


def _natural_key(name: str) -> tuple:
    digits = "".join(c for c in name if c.isdigit())
    return (name.rstrip("0123456789"), int(digits) if digits else -1)


def sample_png_text(step: int, prompt_index: int, seed: int, prompt_text: str | None, settings: dict,
                    api_prompt: dict | None = None, extra_pnginfo: dict | None = None) -> dict[str, str]:
    """PNG text chunks of one sample: step, seed and prompt as plain text, everything as JSON in
    `lora_trainer_sample`, and ComfyUI's own `prompt` / `workflow` chunks (as Save Image writes
    them) so dropping the picture on ComfyUI opens the run's workflow."""
    record = {"step": step, "prompt_index": prompt_index, "seed": seed, "prompt": prompt_text, **settings}
    text = {"step": str(step), "seed": str(seed), "prompt_index": str(prompt_index),
            "lora_trainer_sample": json.dumps(record)}
    if prompt_text is not None:
        text["sample_prompt"] = prompt_text
    if api_prompt is not None:
        text["prompt"] = json.dumps(api_prompt)
    for key, value in (extra_pnginfo or {}).items():
        text[key] = json.dumps(value)
    return text


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float in [0, 1] -> uint8 array (RGB), truncated as ComfyUI's Save Image does, so a
    saved sample and the same cell of the grid saved by Save Image have the same pixels."""
    array = image.detach().float().mul(255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return array[..., :3]


def png_bytes(image: torch.Tensor, text: dict[str, str] | None = None) -> bytes:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def grid(rows: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """IMAGE [1, rows * H, columns * W, 3]: one row per sampled step, one column per prompt."""
    if not rows or not rows[0]:
        raise ValueError("no sample images to put in a grid")
    return torch.cat([torch.cat([image[..., :3].float().cpu() for image in row], dim=1) for row in rows],
                     dim=0)[None]


def row_strip(row: Sequence[torch.Tensor], width: int) -> Image.Image:
    """One step's samples side by side, scaled to `width` pixels: shown under the live loss chart."""
    strip = Image.fromarray(to_uint8(torch.cat([image[..., :3] for image in row], dim=1)))
    height = max(1, round(strip.height * width / strip.width))
    return strip.resize((width, height), Image.Resampling.LANCZOS)


def stack_vertically(top: Image.Image, bottom: Image.Image | None) -> Image.Image:
    if bottom is None:
        return top
    width = max(top.width, bottom.width)
    canvas = Image.new("RGB", (width, top.height + bottom.height), "white")
    canvas.paste(top.convert("RGB"), (0, 0))
    canvas.paste(bottom.convert("RGB"), (0, top.height))
    return canvas
