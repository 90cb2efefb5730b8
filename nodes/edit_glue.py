"""ComfyUI glue for edit pairs: control images -> each sample's own reference latents in its CONDITIONING.

A sample's conditioning gets `reference_latents` (a list of raw VAE latents [1, C, (T,) h, w]),
exactly what ComfyUI's ReferenceLatent / TextEncodeQwenImageEdit(Plus) nodes put there at inference,
so the model's own `extra_conds` turns them into its `ref_latents` while training. For the
Qwen-Image-Edit family the prompt itself also sees the control images (Qwen2.5-VL reads them), so
the text is encoded per sample by ComfyUI's own TextEncodeQwenImageEdit(Plus) node code, with no
VAE (the reference latents are made here, at the size the family's rule gives).
"""

from __future__ import annotations

import torch

from ..lora_core.data.pairs import EDIT_FAMILY_KEY, EditFamily, family_by_key
from ..lora_core.errors import UserInputError
from .lists import conditioning_entry


_OTHER_PLAIN_TOKENIZERS = {"SD1Tokenizer", "SDXLTokenizer", "SD2Tokenizer", "SD3Tokenizer"}


def check_text_encoder(clip, family: EditFamily) -> None:
    """Refuse a text encoder of another family (a Qwen prompt needs Qwen2.5-VL to see the controls)."""
    if clip is None:
        raise UserInputError("Make Training Dataset needs a text encoder: connect the CLIP output of your loader.")
    name = type(getattr(clip, "tokenizer", None)).__name__
    is_qwen = "qwen" in name.lower()
    # A Qwen prompt must come from Qwen2.5-VL (it reads the controls); plain-text families only refuse
    # an encoder that is clearly another family's (custom loaders may wrap the tokenizer under another name).
    wrong = not is_qwen if family.tokenizer_hint == "Qwen" else (is_qwen or name in _OTHER_PLAIN_TOKENIZERS)
    if wrong:
        own = ("Qwen2.5-VL 7B, CLIPLoader type qwen_image" if family.tokenizer_hint == "Qwen"
               else "clip_l + t5xxl, DualCLIPLoader type flux")
        raise UserInputError(
            f"edit_model is {family.label}, but the text encoder connected is a {name}: connect {family.label}'s "
            f"own text encoder ({own}) or pick the edit_model that matches it.")


def encode_edit_text(clip, text: str, controls: list[torch.Tensor], family: EditFamily):
    """The prompt's CONDITIONING as the family's own text node makes it (controls [H, W, 3] seen by Qwen2.5-VL)."""
    from comfy_extras import nodes_qwen  # ComfyUI's own nodes, so training sees what inference sees

    images = [c[..., :3].unsqueeze(0) for c in controls]
    if family.text_encoding == "qwen_edit":
        return nodes_qwen.TextEncodeQwenImageEdit.execute(clip, text, None, images[0]).args[0]
    if family.text_encoding == "qwen_edit_plus":
        if len(images) > 3:
            raise UserInputError(f"{family.label}'s text encoder reads at most 3 images; a sample has {len(images)}.")
        return nodes_qwen.TextEncodeQwenImageEditPlus.execute(clip, text, None, *images).args[0]
    raise ValueError(f"{family.label} encodes text without images")


def with_reference_latents(conditioning, latents: list[torch.Tensor], family: EditFamily) -> list:
    """A new one-entry CONDITIONING: the sample's own reference latents and the family it was made for."""
    tensor, values = conditioning_entry(conditioning)
    return [[tensor, {**values, "reference_latents": [lat.cpu() for lat in latents], EDIT_FAMILY_KEY: family.key}]]


def check_model_takes_references(base_model, model_config_name: str, entry: list, encode) -> None:
    """Before training on a sample with reference latents: does this model read them, and is it their family?

    `encode(entry)` gives the model's own conditioning for one [tensor, dict] entry; a model whose
    `extra_conds` ignores `reference_latents` returns the same keys with and without them.
    """
    values = entry[1]
    family = family_by_key(values.get(EDIT_FAMILY_KEY, ""))
    if family is not None and model_config_name not in family.model_configs:
        raise UserInputError(
            f"The dataset was made for {family.label} (edit pairs), but the model is {model_config_name}: load the "
            f"{family.label} model, or make the dataset again with the edit_model of this model.")
    plain = encode([entry[0], {k: v for k, v in values.items() if k not in ("reference_latents", EDIT_FAMILY_KEY)}])
    with_refs = encode(entry)
    if set(with_refs) == set(plain):
        count = len(values.get("reference_latents") or [])
        raise UserInputError(
            f"{model_config_name} takes no reference images, but each training sample carries {count} (an edit-pair "
            f"dataset): train edit pairs on Flux.1 Kontext or Qwen-Image-Edit, or make the dataset without controls.")
