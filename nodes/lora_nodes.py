"""LoRA nodes: save a LORA_MODEL to the loras folder, apply one to a model, plot the loss.

LORA_MODEL values are our `LoraModel` (a plain dict of tensors with metadata riding along) or a
plain dict made by ComfyUI's own trainer; both work everywhere (`as_lora_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..lora_core.lorafile import files
from ..lora_core.adapters.adapter_set import AdapterSet
from ..lora_core.adapters.attach import attach_bypass
from ..lora_core.errors import UserInputError
from ..lora_core.lorafile.keys import (
    INTERNAL_PREFIX,
    ModelKeys,
    adapter_set_from_tensors,
    lycoris_oft_to_comfy,
    read_keys,
    split_text_encoder,
)
from ..lora_core.lorafile.lora_model import LoraModel, as_lora_model
from . import comfy_glue as glue
from .outputs import (algorithm_of, alpha_of, file_metadata, loss_series, rank_of,  # noqa: F401 (re-exported)
                      save_optimizer_state, write_lora_file, write_loss_graph)

log = logging.getLogger(__name__)

CATEGORY = "LoRA Trainer/lora"
PREFIX = "LoRATrainer_"
LORA_MODEL = io.Custom("LORA_MODEL")
LOSS_MAP = io.Custom("LOSS_MAP")



# ---- writing files -------------------------------------------------------------------------------

def write_lora(lora: LoraModel, prefix: str, steps: int | None, kohya_export: bool = False) -> Path:
    """Write `lora` to loras/<prefix>[_<steps>_steps]_<NNNNN>_.safetensors (never overwriting),
    its optimizer state beside it when it has one, and a kohya-named copy on request."""
    path = write_lora_file(glue.lora_root(), lora, prefix, steps, kohya_export)
    glue.refresh_lora_list()
    return path


def relative_lora_name(path: Path) -> str:
    for root in glue.lora_roots_text():
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.name


# ---- reading files -------------------------------------------------------------------------------

def read_lora_file(name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a file from the loras list; safetensors only, clear errors."""
    tensors, metadata = files.load_lora(glue.lora_path(name))
    return tensors, metadata


def diffusion_part(tensors: dict, where: str) -> dict:
    """The file's tensors minus text-encoder keys (logged), which a model-only loader skips."""
    kept, dropped = split_text_encoder(tensors)
    if dropped:
        log.warning("[LoRA Trainer] %s: %d text-encoder tensors are not applied (model only).", where, len(dropped))
    if not kept:
        raise UserInputError(f"{where} holds no diffusion-model tensors (only text-encoder ones): pick a LoRA "
                             f"for the diffusion model.")
    return kept


def merged_keys(model, tensors: dict, metadata: dict | None, where: str) -> dict:
    """The tensors for ComfyUI's merging loader, under names it maps: read as bypass reads them (more
    naming schemes than ComfyUI's table, PEFT alpha from the adapter metadata, LyCORIS OFT constraints
    converted), so both modes apply the same weights. A file our reader refuses (DoRA, Tucker...,
    which ComfyUI can merge) goes to ComfyUI as it is, and ComfyUI reports what it cannot place."""
    try:
        keys = ModelKeys.of(model.model.diffusion_model, glue.lora_key_aliases(model))
        return read_keys(tensors, metadata, keys, INTERNAL_PREFIX, where).tensors
    except UserInputError as reason:
        log.info("[LoRA Trainer] %s: merged by ComfyUI's loader as it is (%s)", where, reason)
        return lycoris_oft_to_comfy(tensors, metadata or {})


def adapter_set_for(model, tensors: dict, metadata: dict | None, where: str) -> AdapterSet:
    """An AdapterSet on `model`'s diffusion model from internal, kohya, LyCORIS or PEFT keys
    (any name ComfyUI's key tables know, slices of fused layers included)."""
    tensors = diffusion_part(tensors, where)
    return adapter_set_from_tensors(tensors, metadata, model.model.diffusion_model, INTERNAL_PREFIX,
                                    glue.lora_key_aliases(model), where)


# ---- nodes ---------------------------------------------------------------------------------------

class SaveLoRAWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "SaveLoRAWeights",
            display_name="Save LoRA Weights",
            category=CATEGORY,
            description="Write the trained LoRA as .safetensors into the loras model folder (so every LoRA loader "
                        "and Train LoRA's existing_lora list it at once), with training metadata; never overwrites.",
            search_aliases=["export lora", "save lora"],
            is_output_node=True,
            inputs=[
                LORA_MODEL.Input("lora", tooltip="The 'lora' output of Train LoRA (ours or ComfyUI's)."),
                io.String.Input("prefix", default="trained_lora",
                                tooltip="File name prefix inside models/loras/; subfolders allowed "
                                        "('project/character'). A step count and a counter are appended."),
                io.Int.Input("steps", optional=True, force_input=True, min=0,
                             tooltip="Total steps for the file name; connect Train LoRA's 'steps'. Not connected: "
                                     "taken from the LoRA's metadata."),
                io.Boolean.Input("kohya_export", default=False,
                                 tooltip="Also write a copy with the key names kohya-ss / musubi-tuner give this model "
                                         "family (<name>_kohya.safetensors), for A1111 / Forge, kohya-ss, LyCORIS and "
                                         "diffusers. ComfyUI reads either. Families without confirmed kohya-ss names "
                                         "(see README) stop with a message."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The file name as the loras list shows it.")],
        )

    @classmethod
    def execute(cls, lora, prefix, kohya_export=False, steps=None) -> io.NodeOutput:
        lora = as_lora_model(lora)
        if steps is None:
            steps = _int_or_none(lora.metadata.get("steps"))
        path = write_lora(lora, prefix, steps, kohya_export)
        name = relative_lora_name(path)
        log.info("[LoRA Trainer] saved %s", path)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved loras/{name}"))


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class LoadLoRAModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadLoRAModel",
            display_name="Load LoRA Model",
            category=CATEGORY,
            description="Apply a LoRA (a Train LoRA output and/or a file from the loras list) to a model. Merged: "
                        "ComfyUI's own LoRA patching. Bypass: computed beside each layer, weights untouched "
                        "(quantized models); several bypass LoRAs stack.",
            search_aliases=["apply lora", "lora loader"],
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRA to."),
                LORA_MODEL.Input("lora", optional=True,
                                 tooltip="LoRA weights from Train LoRA (ours or ComfyUI's). Optional if a file is picked."),
                io.Combo.Input("lora_name", options=[glue.NO_LORA] + glue.lora_names(), default=glue.NO_LORA,
                               optional=True,
                               tooltip="A LoRA file from models/loras (ours, ComfyUI's, kohya-ss, LyCORIS, PEFT). "
                                       "If 'lora' is connected too, both are applied."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model: 1.0 as trained, 0 = off, "
                                       "negative inverts. Usual range 0.5-1.2."),
                io.Boolean.Input("bypass", default=False,
                                 tooltip="Off: merge into the weights (fastest sampling). On: compute the LoRA beside "
                                         "each layer; needed for FP8/FP4 (quantized) models, matches bypass training."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, strength, bypass, lora=None, lora_name=glue.NO_LORA) -> io.NodeOutput:
        sources: list[tuple[dict, dict | None, str]] = []
        if lora is not None:
            lora = as_lora_model(lora)
            sources.append((dict(lora), lora.metadata, "The connected lora"))
        if lora_name and lora_name != glue.NO_LORA:
            tensors, metadata = read_lora_file(lora_name)
            sources.append((tensors, metadata, f"loras/{lora_name}"))
        if not sources:
            raise UserInputError("Load LoRA Model has no LoRA: connect the 'lora' output of Train LoRA or pick a "
                                 "file in lora_name.")
        if strength == 0:
            return io.NodeOutput(model)
        for tensors, metadata, where in sources:
            if bypass:
                adapter_set = adapter_set_for(model, tensors, metadata, where)
                model = glue.apply_bypass(model, _bypass_attacher(adapter_set, strength))
            else:
                model = glue.apply_merged(model, merged_keys(model, diffusion_part(tensors, where), metadata, where),
                                          strength)
        return io.NodeOutput(model)


def _bypass_attacher(adapter_set: AdapterSet, strength: float):
    def attach(diffusion_model: torch.nn.Module):
        device = next((p.device for p in diffusion_model.parameters() if p.device.type != "meta"), None)
        if device is not None:
            adapter_set.to(device=device)
        return attach_bypass(diffusion_model, adapter_set, strength)

    return attach


class PlotLossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "PlotLossGraph",
            display_name="Plot Loss Graph",
            category="LoRA Trainer/training",
            description="Chart of the raw loss, a smoothed curve and the validation loss over optimizer steps; "
                        "shown here and saved as PNG under output/.",
            search_aliases=["loss chart", "training graph", "plot loss"],
            is_output_node=True,
            inputs=[
                LOSS_MAP.Input("loss", tooltip="The 'loss_map' output of Train LoRA (ours or ComfyUI's)."),
                io.String.Input("filename_prefix", default="loss_graph",
                                tooltip="PNG name prefix under output/ (subfolders allowed); a counter is appended."),
                io.Boolean.Input("log_scale", default=False,
                                 tooltip="Logarithmic loss axis: shows late, small improvements better."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The chart as an image.")],
        )

    @classmethod
    def execute(cls, loss, filename_prefix, log_scale) -> io.NodeOutput:
        path, subfolder, png = write_loss_graph(glue.output_directory(), filename_prefix, loss, log_scale)
        image = glue.png_to_pil(png).convert("RGB")
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
        saved = ui.SavedImages([ui.SavedResult(path.name, subfolder, io.FolderType.output)])
        return io.NodeOutput(tensor, ui=saved)


NODES = [SaveLoRAWeights, LoadLoRAModel, PlotLossGraph]
