"""Everything that touches ComfyUI internals, in one place.

The node classes call these functions; `lora_core` never sees a ComfyUI object. What lives here:
- `ComfyDenoiser`: lora_core's `Denoiser` protocol over a ModelPatcher, for every model family,
  by asking ComfyUI itself: noising from `model_sampling.noise_scaling`, the sigma table from
  `percent_to_sigma`, (c_skip, c_out) probed from `calculate_denoised`, latents through
  `process_latent_in`, conditioning through the model's own `extra_conds` (SDXL size embeddings,
  pooled outputs, Flux guidance...) and `apply_model`.
- `training_session`: a clone of the caller's model loaded for training, grad enabled, ComfyUI in
  training mode; everything reset in `finally` so a cancel leaves the caller's model untouched.
- VAE / CLIP encoding for the dataset nodes, folder helpers (input/, loras/, datasets/, output/)
  that refuse paths leading outside, progress bar + live loss chart, cancel.
- Bypass application of a LoRA on a ModelPatcher clone through a PatcherInjection, so our hooks
  exist only while that clone is the one loaded and any number of bypass LoRAs stack.
- LoRA key names: the other names of the model's layers from ComfyUI's own key tables
  (`comfy.lora.model_lora_keys_unet`, `comfy.utils.unet_to_diffusers`), called, never copied, so
  files named for diffusers, kohya-ss, musubi-tuner... are read as ComfyUI reads them, and the
  kohya-ss export uses the names those tools give each family.

Invariant: no hook, wrapper or flag set here outlives the call that set it, except through a
ModelPatcher clone that owns it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths

from ..lora_core.adapters.sliced import Slice
from ..lora_core.data.paths import is_inside
from ..lora_core.lorafile.keys import KohyaNaming
from ..lora_core.errors import UserInputError
from ..lora_core.memory.quantized import LowVramCheck, check_low_vram_settings
from . import outputs
from .lists import Throttle, conditioning_entry

log = logging.getLogger(__name__)

# Keep t strictly inside (0, 1): percent_to_sigma(0) is "infinite" noise for discrete models.
_PERCENT_EPS = 1e-5
# Flux.1's resolution-dependent shift: mu from 0.5 at 256 image tokens to 1.15 at 4096 (ComfyUI's
# ModelSamplingFlux node defaults, the values of the Flux reference code).
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15


# --------------------------------------------------------------------------------------------
# The denoiser
# --------------------------------------------------------------------------------------------


class ComfyDenoiser:
    """`lora_core.training.denoiser.Denoiser` over a loaded ModelPatcher (any ComfyUI model family)."""

    key_prefix = "diffusion_model."

    def __init__(self, patcher):
        self.patcher = patcher
        self.base = patcher.model                                   # comfy.model_base.BaseModel
        self.module = self.base.diffusion_model
        # Object patches (ModelSamplingFlux / SD3 shift nodes...) are applied at load time.
        self.sampling = patcher.get_model_object("model_sampling")
        self.prediction_type = _prediction_name(self.base)
        self.device = patcher.load_device
        self._encoded: dict[tuple, tuple[object, dict]] = {}
        self._references_checked = False

    # -- noise levels -------------------------------------------------------------------------
    def sigma_at(self, t: torch.Tensor, latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        percents = (1.0 - t.detach().float().flatten().cpu()).clamp(_PERCENT_EPS, 1.0 - _PERCENT_EPS)
        mu = self._resolution_shift(latent_shape)
        if mu is not None:
            sigmas = [comfy.model_sampling.flux_time_shift(mu, 1.0, 1.0 - float(p)) for p in percents]
        else:
            sigmas = [float(self.sampling.percent_to_sigma(float(p))) for p in percents]
        return torch.tensor(sigmas, dtype=torch.float32, device=t.device)

    def _resolution_shift(self, latent_shape: tuple[int, ...] | None) -> float | None:
        """Flux.1 dev's shift for this image size (mu of ComfyUI's ModelSamplingFlux node, the schedule
        Flux was trained with and what ai-toolkit / musubi-tuner train it with); None for every other
        model, and when a model-sampling node already set the shift (the user's choice wins)."""
        if (latent_shape is None or len(latent_shape) < 2 or type(self.base) is not comfy.model_base.Flux
                or not isinstance(self.sampling, comfy.model_sampling.ModelSamplingFlux)
                or "model_sampling" in self.patcher.object_patches):
            return None
        tokens = latent_shape[-2] * latent_shape[-1] / 4  # 2x2 latent patches
        slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (4096 - 256)
        return FLUX_BASE_SHIFT + slope * (tokens - 256)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(device=x0.device, dtype=torch.float32).flatten()
        return self.sampling.noise_scaling(sigma, noise, x0, False)

    def output_coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # denoised = c_skip * x + c_out * out for every ComfyUI parametrisation, so probing with
        # (x=1, out=0) and (x=0, out=1) reads both coefficients without a per-model formula.
        s = sigma.detach().float().flatten()
        ones = torch.ones(s.shape[0], 1, device=s.device)
        zeros = torch.zeros_like(ones)
        c_skip = self.sampling.calculate_denoised(s, zeros, ones)
        c_out = self.sampling.calculate_denoised(s, ones, zeros)
        return _per_sample_vector(c_skip, s), _per_sample_vector(c_out, s)

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(latents)

    @property
    def autograd_reference_ops(self) -> dict:
        """Fused ops the model may call that autograd cannot differentiate, with a torch twin."""
        return kitchen_reference_ops()

    # -- the forward pass -----------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, conds: list) -> torch.Tensor:
        if len(conds) != x_t.shape[0]:
            raise ValueError(f"{len(conds)} conditionings for a batch of {x_t.shape[0]} latents")
        sigma = sigma.to(device=x_t.device, dtype=torch.float32).flatten()
        per_sample = [
            {k: v.process_cond(batch_size=1, area=None) for k, v in self._model_conds(c, x_t[i:i + 1]).items()}
            for i, c in enumerate(conds)
        ]
        groups = _concat_groups(per_sample)
        if len(groups) == 1:
            return self._apply(x_t, sigma, per_sample)
        out = torch.empty(x_t.shape, dtype=torch.float32, device=x_t.device)
        for group in groups:
            index = torch.tensor(group, device=x_t.device)
            out = out.index_copy(0, index, self._apply(x_t[index], sigma[index], [per_sample[i] for i in group]))
        return out

    def _apply(self, x: torch.Tensor, sigma: torch.Tensor, model_conds: list[dict]) -> torch.Tensor:
        kwargs = comfy.samplers.cond_cat(model_conds)
        options = comfy.patcher_extension.copy_nested_dicts(
            self.patcher.model_options.get("transformer_options", {})
        )
        options["cond_or_uncond"] = [0] * x.shape[0]
        options["uuids"] = [None] * x.shape[0]
        options["sigmas"] = sigma
        return self.base.apply_model(x, sigma, transformer_options=options, **kwargs)

    def _model_conds(self, cond, like: torch.Tensor) -> dict:
        """The model's own conditioning objects for one sample (cached per caption and shape)."""
        key = (id(cond), tuple(like.shape[1:]))
        hit = self._encoded.get(key)
        if hit is None:
            shape_probe = torch.zeros(like.shape, dtype=torch.float32)

            def encode(entry: list) -> dict:
                converted = comfy.sampler_helpers.convert_cond([entry])[0]
                return comfy.samplers.encode_model_conds(
                    self.base.extra_conds, [converted], shape_probe, self.device, "positive",
                    latent_image=shape_probe, seed=0,
                )[0]["model_conds"]

            entry = conditioning_entry(cond)
            if "reference_latents" in entry[1] and not self._references_checked:
                from .edit_glue import check_model_takes_references  # edit pairs: does this model read them?

                check_model_takes_references(self.base, type(self.base.model_config).__name__, entry, encode)
                self._references_checked = True
            encoded = {"model_conds": encode(entry)}
            # Holding `cond` keeps its id from being reused by another object.
            hit = (cond, encoded["model_conds"])
            self._encoded[key] = hit
        return hit[1]


# comfy_kitchen's fused rope / norm kernels (Cosmos Predict2 and Anima call them whatever
# `in_training` says). Quantization and matmul kernels are left to ComfyUI's own training paths.
_KITCHEN_MATH_OPS = ("apply_rope", "rms_rope", "adaln", "rms_adaln")
_kitchen_references: dict | None = None


def kitchen_reference_ops() -> dict:
    """{comfy_kitchen op: its eager (plain torch) implementation} for the fused math ops that have
    no autograd formula. The eager backend computes the same values, and autograd differentiates
    it; `AutogradSafety` calls it instead of the kernel inside every training step."""
    global _kitchen_references
    if _kitchen_references is None:
        _kitchen_references = _find_kitchen_references()
    return _kitchen_references


def _find_kitchen_references() -> dict:
    try:
        from comfy_kitchen.backends import eager
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return {}
    found = {}
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("comfy_kitchen::")}
    for name in sorted(names):
        definition = OPDEFS.get(f"comfy_kitchen::{name}")
        function = getattr(eager, name, None)
        if (not name.startswith(_KITCHEN_MATH_OPS) or function is None or definition is None
                or definition._backward_fn is not None):
            continue
        packet = getattr(torch.ops.comfy_kitchen, name)
        schema = packet.default._schema
        if any(arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments):
            continue  # in-place variants: inference only
        reference = _called_by_name(function, [arg.name for arg in schema.arguments])
        found[packet] = reference
        for overload in packet.overloads():
            found[getattr(packet, overload)] = reference
    return found


def _called_by_name(function: Callable, names: list[str]) -> Callable:
    # The kernels' positional arguments, passed by name: the eager functions share the schema's names.
    def reference(*args, **kwargs):
        return function(**dict(zip(names, args)), **kwargs)

    return reference


def _prediction_name(base) -> str:
    name = getattr(base.model_type, "name", str(base.model_type)).lower()
    # FLUX (Flux, Chroma, Qwen-Image, LTX) and FLOW_COSMOS are flow matching too: the network
    # predicts the velocity noise - x0, like FLOW; they differ only in how sigma is spaced / scaled.
    return {"eps": "eps", "v_prediction": "v", "flow": "flow", "flux": "flow", "flow_cosmos": "flow",
            "edm": "edm"}.get(name, name)


def _per_sample_vector(values, sigma: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float32, device=sigma.device)
    return values.flatten().expand(sigma.shape[0]) if values.numel() == 1 else values.flatten()


def _concat_groups(per_sample: list[dict]) -> list[list[int]]:
    """Indices grouped so each group's conditionings concatenate (ComfyUI's can_concat rules)."""
    groups: list[list[int]] = []
    for i, conds in enumerate(per_sample):
        for group in groups:
            first = per_sample[group[0]]
            if first.keys() == conds.keys() and all(first[k].can_concat(conds[k]) for k in first):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


# --------------------------------------------------------------------------------------------
# The training session
# --------------------------------------------------------------------------------------------

def low_vram_check(model, config, quantized_backward: bool) -> LowVramCheck:
    """Refuse settings that cannot work on this model (merge mode on float8 / packed weights,
    offloading without checkpointing) before anything is loaded; show the warnings (FP8 backward
    unavailable, training_dtype other than none on a quantized model) in the log and the UI."""
    check = check_low_vram_settings(
        model.model.diffusion_model, device=model.load_device, bypass=config.bypass,
        training_dtype=config.training_dtype, gradient_checkpointing=config.gradient_checkpointing,
        offloading=config.offloading, quantized_backward=quantized_backward,
    )
    for warning in check.warnings:
        log.warning("[LoRA Trainer] %s", warning)
        send_text(warning)
    return check


@contextlib.contextmanager
def training_session(model, offloading: bool, quantized_backward: bool = False) -> Iterator[ComfyDenoiser]:
    """A clone of `model` loaded for training; ComfyUI's flags and the clone undone on exit.

    Autograd needs normal tensors: ComfyUI loads weights under `torch.inference_mode()`, and an
    inference tensor cannot be saved for backward, so frozen weights that are inference tensors
    are swapped for identical normal ones (values unchanged, the caller's inference unaffected).
    """
    # A dynamic-VRAM patcher streams weights in ways autograd cannot follow: train on a plain one.
    patcher = model.clone(disable_dynamic=True) if model.is_dynamic() else model.clone()
    previous_fp8_bwd = comfy.model_management.training_fp8_bwd
    with torch.inference_mode(False), torch.enable_grad():
        try:
            comfy.model_management.in_training = True
            comfy.model_management.training_fp8_bwd = quantized_backward
            # Ask for all memory, as ComfyUI's trainer does: other models leave VRAM, and with
            # offloading as few weights as possible are loaded. The engine's BlockOffloader then
            # streams the rest one block at a time as fresh tensors: ComfyUI's own per-layer casts
            # may reuse one buffer across layers, which a block recomputed in backward cannot keep.
            comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=not offloading)
            _make_autograd_safe(patcher.model)
            patcher.pre_run()
            yield ComfyDenoiser(patcher)
        finally:
            patcher.cleanup()
            comfy.model_management.in_training = False
            comfy.model_management.training_fp8_bwd = previous_fp8_bwd


def _make_autograd_safe(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
            elif param is not None:
                param.requires_grad_(False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()


def base_model_name(model) -> str:
    """e.g. "SD15", "SDXL", "Flux": ComfyUI's model config class name."""
    return type(model.model.model_config).__name__


# Families the family matrix (tests/integration/test_family_matrix.py) trains, for messages.
TESTED_FAMILIES = ("Flux.1 dev / schnell, Chroma, Flux.2, SDXL, SD1.5, SD2.x (v), SD3.5, Qwen-Image, Z-Image, "
                   "Wan 2.1 T2V / I2V, Wan 2.2 5B and 14B, HunyuanVideo 1.5, LTX-Video, HiDream, "
                   "Cosmos Predict2, Kandinsky 5, AuraFlow")
_AUDIO = "an audio model: the trainer takes image and video latents only"
_THREE_D = "a 3D-asset model: the trainer takes image and video latents only"
_NOT_DIFFUSION = "not a diffusion model, so there is nothing to denoise"
_PACKED = "audio and video latents travel packed in one tensor, which the trainer does not split yet"
# ComfyUI model config class -> why Train LoRA cannot train it.
UNSUPPORTED_FAMILIES = {
    "StableAudio": _AUDIO, "StableAudio3": _AUDIO, "ACEStep": _AUDIO, "ACEStep15": _AUDIO,
    "MiniMaxMusic3": _AUDIO, "LTXAV": _PACKED, "MiniMaxH3": _PACKED,
    "Hunyuan3Dv2": _THREE_D, "Hunyuan3Dv2_1": _THREE_D, "Hunyuan3Dv2mini": _THREE_D, "Trellis2": _THREE_D,
    "TripoSplat": _THREE_D,
    "SAM3": _NOT_DIFFUSION, "SAM31": _NOT_DIFFUSION, "RT_DETR_v4": _NOT_DIFFUSION, "DepthAnything3": _NOT_DIFFUSION,
}
# Model types whose sampling does not start from noise (image-to-image predictors).
_NO_NOISE_TYPES = ("IMG_TO_IMG", "IMG_TO_IMG_FLOW")


def check_trainable(model) -> None:
    """Refuse, naming the family, a model Train LoRA cannot train: before anything is loaded, so
    the user sees why instead of a traceback from inside the model."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if inner is None or config is None:
        raise UserInputError(
            f"The model input is a {type(model).__name__}, not a diffusion model: connect the MODEL output of a "
            "checkpoint or diffusion-model loader.")
    family = type(config).__name__
    reason = UNSUPPORTED_FAMILIES.get(family)
    model_type = getattr(getattr(inner, "model_type", None), "name", "")
    if reason is None and model_type in _NO_NOISE_TYPES:
        reason = f"its model type {model_type} predicts from an image, not from noise"
    if reason is None and not all(hasattr(getattr(inner, "model_sampling", None), name)
                                  for name in ("percent_to_sigma", "noise_scaling", "calculate_denoised")):
        reason = "its noise schedule is not one ComfyUI samples with (no model_sampling)"
    if reason is not None:
        raise UserInputError(
            f"Train LoRA cannot train this model: it is ComfyUI's {family} family, {reason}. "
            f"Families it trains: {TESTED_FAMILIES}.")


# --------------------------------------------------------------------------------------------
# Dataset encoding
# --------------------------------------------------------------------------------------------


def encode_images(vae, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """VAE latents [1, C, (T,) h, w] per image; images of one size are encoded in batches."""
    latents: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape[-3:]), []).append(i)
    # A video VAE reads a batch of images as the frames of one clip: encode those one by one.
    chunk_size = 1 if getattr(vae, "latent_dim", 2) == 3 and not getattr(vae, "not_video", False) else 16
    pbar = comfy.utils.ProgressBar(len(images))
    done = 0
    for indices in by_shape.values():
        for start in range(0, len(indices), chunk_size):
            chunk = indices[start:start + chunk_size]
            pixels = torch.cat([_as_batch(images[i])[..., :3] for i in chunk], dim=0)
            encoded = vae.encode(pixels)
            for j, i in enumerate(chunk):
                latents[i] = encoded[j:j + 1].cpu()
            done += len(chunk)
            pbar.update_absolute(done, len(images))
    return latents


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    return image if image.ndim == 4 else image.unsqueeze(0)


def encode_texts(clip, texts: Sequence[str]) -> list[list]:
    """One CONDITIONING per text; each distinct text is encoded once and shared."""
    if clip is None:
        raise UserInputError(
            "Make Training Dataset needs a text encoder: connect the CLIP output of your checkpoint "
            "loader (or a Load CLIP node) to 'clip'."
        )
    cache: dict[str, list] = {}
    out = []
    for text in texts:
        if text not in cache:
            cache[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        out.append(cache[text])
    return out


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def input_subfolders() -> list[str]:
    return folder_paths.get_input_subfolders()


NO_LORA = "[None]"


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> Path:
    """Full path of a file from the `loras` list; refuses names leading outside the loras folders."""
    full = folder_paths.get_full_path("loras", name)
    if full is None:
        raise UserInputError(
            f"The LoRA file {name!r} is not in the loras folder ({', '.join(lora_roots_text())}): "
            f"pick a file from the list, or press R to refresh it."
        )
    if not any(is_inside(Path(root), Path(full)) for root in folder_paths.get_folder_paths("loras")):
        raise UserInputError(f"The LoRA file {name!r} resolves outside the loras folders: pick a file from the list.")
    return Path(full)


def lora_roots_text() -> list[str]:
    return [str(p) for p in folder_paths.get_folder_paths("loras")]


def lora_root() -> Path:
    """The loras folder files are saved into (the first one ComfyUI lists)."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_save_folder(prefix: str) -> tuple[Path, str]:
    """(folder, file-name prefix) for a save prefix like "my_project/character" inside loras/."""
    return outputs.prefix_folder(lora_root(), prefix)


def refresh_lora_list() -> None:
    """Make the new file appear in `existing_lora` and LoRA loaders without a restart."""
    folder_paths.filename_list_cache.pop("loras", None)


def dataset_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths("datasets")]


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


def output_image_path(prefix: str) -> tuple[Path, str]:
    """(a new, never-used PNG path under output/ for `prefix`, its subfolder relative to output/)."""
    return outputs.output_image_path(output_directory(), prefix)


# --------------------------------------------------------------------------------------------
# Progress, preview, cancel
# --------------------------------------------------------------------------------------------


def processing_interrupted() -> bool:
    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


class TrainingProgress:
    """Progress bar with the loss in the node text and a live loss chart, throttled."""

    def __init__(self, total_steps: int, chart: Callable[[list[float]], Image.Image] | None = None,
                 every_steps: int = 10, every_seconds: float = 10.0):
        # A chart render costs ~0.1 s: every 10 s keeps it near 1% of a run whatever the step time.
        self.total = max(1, int(total_steps))
        self.pbar = comfy.utils.ProgressBar(self.total)
        self.chart = chart
        self.throttle = Throttle(every_steps, every_seconds)
        self.node_id = _executing_node_id()

    def update(self, step: int, loss: float, history: list[float], lr: float | None = None) -> None:
        # Do not call into the progress hook once a cancel is pending: it would raise inside the
        # engine before it could save; the engine sees should_stop() and the node re-raises.
        if processing_interrupted():
            return
        preview = None
        if self.throttle.due(step, self.total, time.monotonic()):
            text = f"step {step}/{self.total}  loss {loss:.4f}"
            if lr is not None:
                text += f"  lr {lr:.2e}"
            send_text(text, self.node_id)
            if self.chart is not None and history:
                preview = ("PNG", self.chart(history), 512)
        self.pbar.update_absolute(step, self.total, preview)


def send_text(text: str, node_id: str | None = None) -> None:
    """Text shown on the node while it runs (no-op outside a running server)."""
    node_id = node_id or _executing_node_id()
    if node_id is None:
        return
    from server import PromptServer

    if PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)


def _executing_node_id() -> str | None:
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return None if context is None else context.node_id


def png_to_pil(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# --------------------------------------------------------------------------------------------
# Applying a LoRA to a model
# --------------------------------------------------------------------------------------------


def apply_merged(model, lora_tensors: dict, strength: float):
    """ComfyUI's own LoRA loader (what core LoraLoader does): weight patches on a clone."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, dict(lora_tensors), strength, 0)
    return patched


class _BypassInjection:
    """Adds / removes our forward hooks on whichever model a patcher injects into.

    Lives in a ModelPatcher clone's `injections`, so the hooks exist only while that clone is
    the loaded one; ComfyUI ejects it before another patcher of the same model runs.
    """

    def __init__(self, attach: Callable[[torch.nn.Module], object]):
        self.attach = attach
        self.attachments: dict[int, object] = {}

    def inject(self, patcher) -> None:
        key = id(patcher.model)
        if key not in self.attachments:
            self.attachments[key] = self.attach(patcher.model.diffusion_model)

    def eject(self, patcher) -> None:
        attachment = self.attachments.pop(id(patcher.model), None)
        if attachment is not None:
            attachment.remove()


def apply_bypass(model, attach: Callable[[torch.nn.Module], object]):
    """A clone of `model` whose diffusion model runs `attach(diffusion_model)`'s hooks when loaded.

    `attach` returns an object with `.remove()`. Each call uses its own injection key, so bypass
    LoRAs stack instead of replacing each other (ComfyUI's single "bypass_lora" key cannot).
    """
    patcher = model.clone()
    injection = _BypassInjection(attach)
    patcher.set_injections(
        f"lora_trainer_bypass_{uuid.uuid4().hex}",
        [comfy.patcher_extension.PatcherInjection(inject=injection.inject, eject=injection.eject)],
    )
    return patcher


def diffusion_module_names(model) -> list[str]:
    """Dotted module names of the diffusion model (to map kohya / PEFT keys onto it)."""
    return [name for name, _ in model.model.diffusion_model.named_modules() if name]


# --------------------------------------------------------------------------------------------
# LoRA key names
# --------------------------------------------------------------------------------------------

_MODEL_PREFIX = "diffusion_model."


def lora_key_aliases(model) -> dict[str, str | Slice]:
    """Every other name ComfyUI's loader knows for the diffusion model's layers (kohya-ss with
    diffusers block names, diffusers/PEFT, OneTrainer, SimpleTuner LyCORIS...) -> our module name,
    or the Slice of a fused layer ComfyUI patches for it (diffusers Flux/SD3 `to_q` -> `qkv`)."""
    aliases: dict[str, str | Slice] = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if isinstance(target, tuple):
            # (weight, (dim, offset, size)): rows of a fused layer. Entries that also transform the
            # weight (a third element, e.g. Flux's swapped norm_out scale/shift) have no bypass form.
            if len(target) != 2 or not isinstance(target[1], tuple) or len(target[1]) != 3:
                continue
            weight, (dim, offset, size) = target
            if dim == 0 and _is_model_weight(weight):
                aliases[name] = Slice(weight[len(_MODEL_PREFIX):-len(".weight")], int(offset), int(size))
        elif isinstance(target, str) and _is_model_weight(target):
            aliases[name] = target[len(_MODEL_PREFIX):-len(".weight")]
    return aliases


def _is_model_weight(key) -> bool:
    return isinstance(key, str) and key.startswith(_MODEL_PREFIX) and key.endswith(".weight")


# ComfyUI model config -> (family, how kohya-ss / musubi-tuner name its layers, their ss_* fields).
# "diffusers": sd-scripts builds SD1.x/2.x as a diffusers-named UNet; "own": the tool's model uses
# ComfyUI's names (SDXL's LDM UNet in sd-scripts, BFL Flux, original Wan, Qwen-Image);
# "original_hunyuan": musubi-tuner's HunyuanVideo keeps the original names (img_attn_qkv, mlp.fc1),
# which ComfyUI's table lists under "transformer.".
_KOHYA_FAMILIES = {
    "SD15": ("SD1.x", "diffusers", {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False"}),
    "SD20": ("SD2.x", "diffusers", {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v2", "ss_v2": "True"}),
    "SDXL": ("SDXL", "own", {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}),
    "Flux": ("Flux", "own", {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}),
    "FluxSchnell": ("Flux", "own", {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}),
    "WAN21_T2V": ("Wan", "own", {"ss_network_module": "networks.lora_wan"}),
    "WAN21_I2V": ("Wan", "own", {"ss_network_module": "networks.lora_wan"}),
    "WAN22_T2V": ("Wan", "own", {"ss_network_module": "networks.lora_wan"}),
    "HunyuanVideo": ("HunyuanVideo", "original_hunyuan", {"ss_network_module": "networks.lora"}),
    "QwenImage": ("Qwen-Image", "own", {"ss_network_module": "networks.lora_qwen_image"}),
}


def kohya_naming(model) -> KohyaNaming:
    """How kohya-ss / musubi-tuner name this model's layers, or why there is no kohya export."""
    config = base_model_name(model)
    if config not in _KOHYA_FAMILIES:
        return KohyaNaming(config, None, reason=(
            f"the layer names kohya-ss / musubi-tuner write for {config} models are not confirmed for this pack, "
            "and a guessed name would load as nothing in those tools."))
    family, how, fields = _KOHYA_FAMILIES[config]
    modules = diffusion_module_names(model)
    if how == "own":
        names = {name: name for name in modules}
    elif how == "diffusers":
        table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        names = {ldm[:-len(".weight")]: diffusers[:-len(".weight")]
                 for diffusers, ldm in table.items() if diffusers.endswith(".weight")}
    else:
        names = {target: alias[len("transformer."):] for alias, target in lora_key_aliases(model).items()
                 if isinstance(target, str) and alias.startswith("transformer.")}
    return KohyaNaming(family, names, dict(fields))
