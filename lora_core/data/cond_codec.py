"""Conditioning (ComfyUI's list of [tensor, dict] pairs) as JSON structure plus a flat tensor dict.

Tensors go to safetensors, everything around them to JSON, so a saved dataset never needs
pickle. Identical tensors are stored once: a dataset with 500 images and 3 captions holds 3
copies of the text embedding, not 500. Values that are neither plain data nor tensors (a
ControlNet, hooks, arbitrary objects) cannot be stored and are refused by name before anything
is written.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..errors import UserInputError

_PLAIN = (type(None), bool, int, float, str)


class CondEncoder:
    """Collects tensors while encoding; `tensors` holds each distinct tensor once, by key."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._key_by_id: dict[int, tuple[str, torch.Tensor]] = {}
        self._key_by_content: dict[tuple, str] = {}

    def encode(self, value: Any, where: str) -> Any:
        """JSON-ready form of `value`; `where` names it in errors ("sample 3 conditioning")."""
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, torch.Tensor):
            return {"t": "tensor", "key": self._tensor_key(value, where)}
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return {"t": "list" if isinstance(value, list) else "tuple", "items": items}
        if isinstance(value, dict):
            items = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise UserInputError(
                        f"{where} has a key {key!r} of type {type(key).__name__}: only text keys can be "
                        f"saved; remove it before saving the dataset."
                    )
                items[key] = self.encode(item, f"{where}[{key!r}]")
            return {"t": "dict", "items": items}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "name": str(value).removeprefix("torch.")}
        raise UserInputError(
            f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which cannot be saved "
            f"(only tensors, numbers, text, None, lists and dicts can): save conditioning straight from a "
            f"text encoder, without ControlNet, hooks or area settings applied."
        )

    def _tensor_key(self, tensor: torch.Tensor, where: str) -> str:
        known = self._key_by_id.get(id(tensor))
        if known is not None and known[1] is tensor:
            return known[0]
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise UserInputError(f"{where} is a {tensor.layout} tensor: only dense tensors can be saved.")
        dense = tensor.detach().to("cpu").contiguous()
        content = (str(dense.dtype), tuple(dense.shape), _digest(dense))
        key = self._key_by_content.get(content)
        if key is None:
            key = f"t{len(self.tensors):06d}"
            self.tensors[key] = dense
            self._key_by_content[content] = key
        # Holding `tensor` keeps its id from being reused by another object while encoding.
        self._key_by_id[id(tensor)] = (key, tensor)
        return key


def decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The value `CondEncoder.encode` was given, with tensors taken from `tensors`."""
    if isinstance(value, _PLAIN):
        return value
    if not isinstance(value, dict) or "t" not in value:
        raise UserInputError(f"{where} in manifest.json is not a valid entry: the dataset is damaged; save it again.")
    kind = value["t"]
    if kind == "tensor":
        key = value.get("key")
        if key not in tensors:
            raise UserInputError(
                f"{where} refers to tensor {key!r}, which is in no conditioning shard: the dataset is "
                f"incomplete; save it again."
            )
        return tensors[key]
    if kind in ("list", "tuple"):
        items = [decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value["items"])]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: decode(v, tensors, f"{where}[{k!r}]") for k, v in value["items"].items()}
    if kind == "dtype":
        dtype = getattr(torch, str(value.get("name")), None)
        if not isinstance(dtype, torch.dtype):
            raise UserInputError(f"{where} in manifest.json names no torch dtype: the dataset is damaged.")
        return dtype
    raise UserInputError(f"{where} in manifest.json has unknown kind {kind!r}: update the node pack.")


def _digest(tensor: torch.Tensor) -> str:
    if tensor.numel() == 0:
        return ""
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=20).hexdigest()
