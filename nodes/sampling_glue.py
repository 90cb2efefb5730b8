"""Sample images during a training run, drawn by ComfyUI's own sampler on the model being trained.

At a sample point (lora_core's schedule, between optimizer steps, under no_grad) the training
clone is already loaded and carries the current adapters as hooks, so each prompt is drawn with
ComfyUI's KSampler code (the scheduler's sigmas, `sampler_object`, CFGGuider with its condition
processing and CFG) and decoded by the connected VAE, then saved, shown and kept for the grid.

Two things differ from a KSampler node, both so training goes on exactly as before:
- ComfyUI's loader is skipped (a PREPARE_SAMPLING wrapper returns the loaded model): loading would
  detach and re-patch the training clone, whose weights the session made autograd-safe and the
  offloader may be streaming. While the VAE loads, the training clone is taken off ComfyUI's list
  of unloadable models, for the same reason.
- The global random state (ComfyUI seeds noise with `torch.manual_seed`) is restored afterwards.
A sample that runs out of memory switches sampling off for the rest of the run with a message;
the training itself continues.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
from comfy_execution.graph_utils import ExecutionBlocker

from ..lora_core.atomic import write_bytes_atomically
from ..lora_core.errors import UserInputError
from ..lora_core.training.sampling import SampleSchedule, prompt_seed, sample_file_name
from . import comfy_glue as glue
from .sample_files import grid, png_bytes, sample_png_text

log = logging.getLogger(__name__)

_WRAPPER_KEY = "lora_trainer_sample_on_loaded_model"


@dataclass
class SampleRequest:
    """What to draw: the prompts (one CONDITIONING each), their negatives, the VAE and the knobs."""

    prompts: list
    negatives: list
    vae: object
    sampler_name: str
    scheduler: str
    steps: int
    cfg: float
    seed: int
    width: int  # 0 = the training latents' size
    height: int
    texts: list = field(default_factory=list)  # prompt text per prompt, None where unknown

    def settings(self) -> dict:
        return {"sampler": self.sampler_name, "scheduler": self.scheduler, "steps": self.steps, "cfg": self.cfg}


def sample_request(prompts: list, negatives: list, vae, settings: dict, texts: list) -> SampleRequest:
    """Checks the sampling inputs before training starts (a wrong input fails now, not at step N)."""
    if vae is None:
        raise UserInputError("Sample prompts are connected but no VAE: connect the VAE of your checkpoint to "
                             "Train LoRA's 'vae' input (it decodes the samples), or disconnect sample_prompts.")
    negatives = list(negatives or [])
    if len(negatives) not in (0, 1, len(prompts)):
        raise UserInputError(f"{len(prompts)} sample prompts but {len(negatives)} negative prompts: connect one "
                             f"negative for all prompts, or one per prompt.")
    if not negatives:
        negatives = [zero_out(p) for p in prompts]  # ComfyUI's ConditioningZeroOut: "no negative"
    elif len(negatives) == 1:
        negatives = negatives * len(prompts)
    if settings["sampler_name"] not in comfy.samplers.KSampler.SAMPLERS:
        raise UserInputError(f"Unknown sampler {settings['sampler_name']!r}: pick one from the list.")
    if settings["scheduler"] not in comfy.samplers.KSampler.SCHEDULERS:
        raise UserInputError(f"Unknown scheduler {settings['scheduler']!r}: pick one from the list.")
    return SampleRequest(prompts=list(prompts), negatives=negatives, vae=vae, texts=texts,
                         **{k: settings[k] for k in ("sampler_name", "scheduler", "steps", "cfg", "seed", "width",
                                                     "height")})


def zero_out(conditioning: list) -> list:
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        for key in ("pooled_output", "conditioning_lyrics", "conditioning_scale"):
            if options.get(key) is not None:
                options[key] = torch.zeros_like(options[key])
        out.append([torch.zeros_like(tensor), options])
    return out


class TrainingSamples:
    """Draws, saves and keeps the samples of one run: `draw(step)` at each sample point."""

    def __init__(self, request: SampleRequest, schedule: SampleSchedule, latent_shape: tuple, folder: Path,
                 subfolder: str, api_prompt: dict | None = None, extra_pnginfo: dict | None = None):
        self.request = request
        self.schedule = schedule
        self.latent_shape = self._latent_shape(latent_shape)
        self.folder = folder
        self.subfolder = subfolder
        self.api_prompt = api_prompt
        self.extra_pnginfo = extra_pnginfo
        self.rows: list[tuple[int, list[torch.Tensor]]] = []
        self.files: list[str] = []
        self.seconds = 0.0
        self.enabled = True

    def _latent_shape(self, training_shape: tuple) -> tuple:
        """[1, C, (T,) h, w]: the training latents' size, or width x height through the VAE's scale."""
        shape = list(training_shape)
        if self.request.width or self.request.height:
            scale = _vae_scale(self.request.vae)
            if self.request.width:
                shape[-1] = max(1, self.request.width // scale)
            if self.request.height:
                shape[-2] = max(1, self.request.height // scale)
        return (1, *shape)

    def draw(self, patcher, step: int) -> None:
        if not self.enabled:
            return
        started = time.perf_counter()
        try:
            images = [self._draw_one(patcher, step, k) for k in range(len(self.request.prompts))]
        except torch.OutOfMemoryError as error:
            self.enabled = False
            message = (f"Sampling at step {step} ran out of memory ({error}); training goes on without samples. "
                       f"Use a smaller sample width/height or fewer prompts.")
            log.warning("[LoRA Trainer] %s", message)
            glue.send_text(message)
            return
        finally:
            patcher.pre_run()  # the sampler's cleanup unset the model's current patcher: training set it
        self.rows.append((step, images))
        self.seconds += time.perf_counter() - started

    def _draw_one(self, patcher, step: int, k: int) -> torch.Tensor:
        request = self.request
        seed = prompt_seed(request.seed, k)
        with _forked_rng(patcher.load_device):
            latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(self.latent_shape))
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = _sample(patcher, noise, latent, request.prompts[k], request.negatives[k], request, seed)
        with _kept_loaded(patcher):
            decoded = request.vae.decode(samples)
        image = decoded.reshape(-1, *decoded.shape[-3:])[0].float().cpu()  # first frame of a video
        text = sample_png_text(step, k, seed, request.texts[k] if k < len(request.texts) else None,
                               request.settings(), self.api_prompt, self.extra_pnginfo)
        name = sample_file_name(step, k)
        write_bytes_atomically(self.folder / name, png_bytes(image, text))
        self.files.append(name)
        return image

    def grid(self) -> torch.Tensor | None:
        return grid([images for _, images in self.rows]) if self.rows else None

    def latest_row(self) -> list[torch.Tensor] | None:
        return self.rows[-1][1] if self.rows else None

    def ui_images(self) -> list[dict]:
        """The saved files as ComfyUI UI image entries (shown on the node when the run ends)."""
        return [{"filename": name, "subfolder": self.subfolder, "type": "output"} for name in self.files]


def _sample(patcher, noise, latent, positive, negative, request: SampleRequest, seed: int) -> torch.Tensor:
    """KSampler's path (comfy.sample.sample) with the guider told the model is loaded already."""
    ksampler = comfy.samplers.KSampler(patcher, steps=request.steps, device=patcher.load_device,
                                       sampler=request.sampler_name, scheduler=request.scheduler, denoise=1.0)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, _WRAPPER_KEY,
                                                 _loaded_already, guider.model_options, is_model_options=True)
    guider.set_conds(positive, negative)
    guider.set_cfg(request.cfg)
    sampler = comfy.samplers.sampler_object(ksampler.sampler)
    samples = guider.sample(noise, latent, sampler, ksampler.sigmas, disable_pbar=True, seed=seed)
    return samples.to(device=comfy.model_management.intermediate_device(),
                      dtype=comfy.model_management.intermediate_dtype())


def _loaded_already(executor, model, noise_shape, conds, model_options=None, **kwargs):
    """PREPARE_SAMPLING without loading: the training session holds the model loaded."""
    return model.model, conds, []


@contextlib.contextmanager
def _forked_rng(device) -> Iterator[None]:
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _kept_loaded(patcher) -> Iterator[None]:
    """The training clone off ComfyUI's list of loaded models while the VAE loads, so freeing VRAM
    for the VAE cannot partially unload it; put back afterwards in its place."""
    loaded = comfy.model_management.current_loaded_models
    held = [(i, m) for i, m in enumerate(loaded) if m.model is patcher]
    for _, entry in reversed(held):
        loaded.remove(entry)
    try:
        yield
    finally:
        for index, entry in held:
            if entry not in loaded:
                loaded.insert(min(index, len(loaded)), entry)


def _vae_scale(vae) -> int:
    try:
        return int(vae.spacial_compression_encode())
    except (AttributeError, TypeError, ValueError):
        return 8


def no_output():
    """An output value that silently skips the nodes it feeds (the grid of a run without samples)."""
    return ExecutionBlocker(None)


def sampler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)
