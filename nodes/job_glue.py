"""ComfyUI models in training jobs: a MODEL as a reference a job can carry, and back.

A job cannot carry a model (tens of GB); it names the file instead, as ComfyUI's own loaders
name it: the model folder ("checkpoints" / "diffusion_models") and the file name inside it,
plus the loader options (weight dtype) and the model-sampling object a ModelSampling* node
patched in (its class and its state, so shift, multiplier and sigma tables come back exactly).
ComfyUI records on every loaded MODEL which loader made it and with what arguments
(`ModelPatcher.cached_patcher_init`); that is what is read here, so the reference comes from the
MODEL input itself, not from widgets that could name another file.

Anything else patched onto the model (LoRAs from a loader node, attention patches, wrappers) is
refused by name: a job that silently dropped it would train another model than the graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import comfy.model_sampling
import comfy.sd
import folder_paths

from ..lora_core.errors import UserInputError
from . import comfy_glue as glue

MODEL_SAMPLING_FILE = "model_sampling.safetensors"
_LOADERS = {  # cached_patcher_init function name -> (job loader name, model folder)
    "load_checkpoint_guess_config": ("checkpoint", "checkpoints"),
    "load_diffusion_model": ("diffusion_model", "diffusion_models"),
}
_PLAIN = (bool, int, float, str, type(None))


# ---- MODEL -> reference -------------------------------------------------------------------------
def model_reference(model) -> tuple[dict, dict]:
    """(the job's "model" entry, {file name: writer(path)} for files it refers to)."""
    init = getattr(model, "cached_patcher_init", None)
    loader = _LOADERS.get(getattr(init[0], "__name__", "") if init else "")
    if loader is None:
        raise UserInputError(
            "Export Training Job cannot tell which file this model was loaded from: connect a model from Load "
            "Checkpoint or Load Diffusion Model (optionally through a ModelSampling node); models from other "
            "loaders, merges or custom nodes cannot be exported yet."
        )
    kind, folder = loader
    args = init[1]
    path = Path(args[0])
    model_options = args[6] if kind == "checkpoint" else args[1]
    _refuse_other_patches(model)
    reference = {
        "kind": "comfyui",
        "loader": kind,
        "folder": folder,
        "file": _name_in_folder(folder, path),
        "size": path.stat().st_size,
        "source_path": str(path),
        "model_options": {k: _encode_option(k, v) for k, v in (model_options or {}).items()},
        "base_model": glue.base_model_name(model),
        "model_sampling": None,
    }
    extra_files = {}
    patched = model.object_patches.get("model_sampling")
    if patched is not None:
        reference["model_sampling"], tensors = _sampling_state(patched)
        reference["model_sampling"]["file"] = MODEL_SAMPLING_FILE
        extra_files[MODEL_SAMPLING_FILE] = lambda target: save_file(tensors, str(target))
    return reference, extra_files


def _name_in_folder(folder: str, path: Path) -> str:
    """The name ComfyUI's list shows for `path` (symlinked files keep their listed name)."""
    for root in folder_paths.get_folder_paths(folder):
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if relative.startswith(".."):
            continue
        name = Path(relative).as_posix()
        listed = folder_paths.get_full_path(folder, name)
        if listed is not None and os.path.samefile(listed, path):
            return name
    raise UserInputError(f"The model file {path} is not inside ComfyUI's {folder} folders: move it there (or add "
                         f"its folder in extra_model_paths.yaml) so a job can name it.")


def _encode_option(name: str, value):
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, _PLAIN):
        return value
    raise UserInputError(f"The model was loaded with option {name} = {value!r}, which a job cannot record: load it "
                         "with Load Checkpoint / Load Diffusion Model and a plain weight_dtype.")


def _decode_option(value):
    if isinstance(value, dict) and set(value) == {"dtype"}:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise UserInputError(f"The job names weight dtype {value['dtype']!r}, which this torch does not have: "
                                 "update torch or export the job with another weight_dtype.")
        return dtype
    return value


def _refuse_other_patches(model) -> None:
    found = []
    if model.patches:
        found.append(f"weight patches on {len(model.patches)} weights (a LoRA loader?)")
    others = sorted(set(model.object_patches) - {"model_sampling"})
    if others:
        found.append("object patches " + ", ".join(others))
    options = {k: v for k, v in model.model_options.items() if k != "transformer_options" and v}
    transformer = {k: v for k, v in model.model_options.get("transformer_options", {}).items() if v}
    if options or transformer:
        found.append("model options " + ", ".join(sorted([*options, *transformer])))
    if found:
        raise UserInputError(
            "The model carries changes a job cannot record (" + "; ".join(found) + "). Export the model straight "
            "from Load Checkpoint / Load Diffusion Model (a ModelSampling node in between is fine); to train on "
            "top of a LoRA, merge it into a checkpoint first."
        )


def _sampling_state(sampling) -> tuple[dict, dict]:
    """(class names + plain attributes, tensors) of a model_sampling object: enough to rebuild it exactly."""
    own = type(sampling)
    classes = [own] if own.__module__ == comfy.model_sampling.__name__ else list(own.__bases__)
    if not all(c.__module__ == comfy.model_sampling.__name__ and hasattr(comfy.model_sampling, c.__name__)
               for c in classes):
        raise UserInputError(f"The model's sampling object ({own.__name__}) does not come from ComfyUI's "
                             "model_sampling module: a job can record only ComfyUI's own ModelSampling nodes.")
    attributes, tensors = {}, {}
    for name, value in vars(sampling).items():
        if name.startswith("_") and name != "_init_alpha_cumprod":
            continue
        if isinstance(value, torch.Tensor):
            tensors[f"attr.{name}"] = value.detach().cpu().contiguous()
        elif isinstance(value, _PLAIN):
            attributes[name] = value
    for name, buffer in sampling._buffers.items():
        if buffer is not None:
            tensors[f"buffer.{name}"] = buffer.detach().cpu().contiguous()
    return {"classes": [c.__name__ for c in classes], "attributes": attributes}, tensors


def _rebuild_sampling(spec: dict, tensors: dict):
    classes = tuple(getattr(comfy.model_sampling, name, None) for name in spec["classes"])
    if any(c is None for c in classes):
        raise UserInputError(f"The job's model sampling uses {', '.join(spec['classes'])}, which this ComfyUI does "
                             "not have: update ComfyUI on this machine.")
    cls = classes[0] if len(classes) == 1 else type("JobModelSampling", classes, {})
    sampling = cls.__new__(cls)
    torch.nn.Module.__init__(sampling)  # state comes from the job, not from a model config
    for name, value in spec["attributes"].items():
        setattr(sampling, name, value)
    for key, tensor in tensors.items():
        kind, name = key.split(".", 1)
        if kind == "buffer":
            sampling.register_buffer(name, tensor)
        else:
            setattr(sampling, name, tensor)
    return sampling


# ---- reference -> MODEL -------------------------------------------------------------------------
def load_model(reference: dict, job_folder: Path):
    """The ModelPatcher the reference names, loaded by ComfyUI's own loader, sampling patch applied."""
    loader, folder, name = reference.get("loader"), reference.get("folder"), reference.get("file")
    if loader not in ("checkpoint", "diffusion_model") or not folder or not name:
        raise UserInputError("The job's model reference is incomplete: export the job again.")
    path = folder_paths.get_full_path(folder, name)
    if path is None and reference.get("source_path") and os.path.isfile(reference["source_path"]):
        path = reference["source_path"]
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths(folder))
        raise UserInputError(f"The model file {name!r} is not in this ComfyUI's {folder} folders ({roots}): copy it "
                             f"there (same name) or add its folder in extra_model_paths.yaml.")
    size = os.path.getsize(path)
    if reference.get("size") not in (None, size):
        raise UserInputError(f"{path} has {size} bytes, but the exported model had {reference['size']}: this is "
                             f"another file under the same name; copy the exported one.")
    options = {k: _decode_option(v) for k, v in (reference.get("model_options") or {}).items()}
    if loader == "checkpoint":
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                      output_clipvision=False, model_options=options)[0]
    else:
        model = comfy.sd.load_diffusion_model(path, model_options=options)
    spec = reference.get("model_sampling")
    if spec:
        tensors = load_file(str(job_folder / MODEL_SAMPLING_FILE))
        model = model.clone()
        model.add_object_patch("model_sampling", _rebuild_sampling(spec, tensors))
    return model
