"""The knobs of Train LoRA, on settings nodes that feed its optional `settings` / `memory` inputs.

Why separate nodes: the frontend (checked in comfyui-frontend-package 1.49.6) folds inputs marked
`advanced` away only in its Vue node mode; the default canvas draws all of them, so Train LoRA
showed 42 widgets. ComfyUI's own sampler nodes solve the same problem by splitting sampler,
sigmas and guider into nodes of their own; here the everyday inputs stay on Train LoRA and the
rest sit on two settings nodes whose output is a plain dict of widget values. Unconnected, every
setting takes the default listed here.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..lora_core.adapters.targets import PRESETS
from ..lora_core.errors import UserInputError
from ..lora_core.training.loop import CHECKPOINT_POLICIES
from .outputs import LORA_DTYPES  # one table for the widget and the files

CATEGORY = "LoRA Trainer/training"
PREFIX = "LoRATrainer_"

TRAINING_SETTINGS = io.Custom("LORA_TRAINING_SETTINGS")
MEMORY_SETTINGS = io.Custom("LORA_MEMORY_SETTINGS")

LOSS_LABELS = {"MSE": "mse", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}


def training_setting_inputs() -> list:
    """How the loss is made, the optimizer's finer knobs, which layers train, files and validation."""
    return [
        io.Int.Input("grad_accumulation_steps", default=1, min=1, max=1024,
                     tooltip="Micro-batches summed per optimizer step: a bigger effective batch without more "
                             "memory (1-8)."),
        io.Combo.Input("loss_function", options=list(LOSS_LABELS), default="MSE",
                       tooltip="MSE is standard; Huber / SmoothL1 are less sensitive to outliers; L1 is sharper "
                               "but noisier."),
        io.Combo.Input("objective", options=["native", "x0"], default="native",
                       tooltip="native: the model's own target (eps / v / flow velocity), recommended. x0: compare "
                               "denoised latents, as ComfyUI's built-in trainer does."),
        io.Combo.Input("timestep_sampling", options=["uniform", "logit_normal", "shifted"], default="uniform",
                       tooltip="How noise levels are drawn: uniform (SD1.5/SDXL), logit_normal (SD3 / Flux style, "
                               "favours the middle), shifted (more high-noise steps)."),
        io.Float.Input("timestep_shift", default=3.0, min=0.1, max=20.0, step=0.1,
                       tooltip="Shift for 'shifted' sampling: > 1 means more high-noise steps (3 is usual)."),
        io.Combo.Input("loss_weighting", options=["none", "min_snr"], default="none",
                       tooltip="min_snr: Min-SNR-gamma weighting, steadier training for eps / v models."),
        io.Float.Input("min_snr_gamma", default=5.0, min=0.1, max=100.0, step=0.1,
                       tooltip="gamma of Min-SNR weighting (5 is the paper's value)."),
        io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Extra per-channel noise so the model learns very dark / bright images (0 = off, "
                               "0.05 typical)."),
        io.Float.Input("min_noise_level", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Train only at noise levels from this one up (0 = from clean; noise level = sigma / "
                               "the model's largest sigma, for flow models sigma itself, musubi-tuner's timestep / "
                               "1000). Wan 2.2 14B high-noise expert: 0.875 (T2V) or 0.9 (I2V), with "
                               "max_noise_level 1."),
        io.Float.Input("max_noise_level", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Train only at noise levels up to this one (1 = pure noise). Wan 2.2 14B low-noise "
                               "expert: 0.875 (T2V) or 0.9 (I2V), with min_noise_level 0."),
        io.Combo.Input("lr_scheduler", options=["constant", "linear", "cosine"], default="constant",
                       tooltip="Learning-rate schedule over the run's steps."),
        io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                     tooltip="Steps of linear learning-rate warmup from 0 (0-100 usual)."),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1,
                       tooltip="Clip the gradient norm to this (1.0 usual); 0 = no clipping."),
        io.Float.Input("weight_decay", default=0.01, min=0.0, max=1.0, step=0.001,
                       tooltip="Decoupled weight decay (AdamW) pulling adapter weights towards 0 (0-0.1)."),
        io.Float.Input("loraplus_ratio", default=1.0, min=0.01, max=64.0, step=0.5,
                       tooltip="LoRA+: the up factors learn this many times faster (16 in the paper); 1 = off."),
        io.Combo.Input("target_preset", options=list(PRESETS) + ["none"], default="all",
                       tooltip="Which layers get adapters: all = every Linear/Conv inside the model's blocks "
                               "(default; transformers: attention + MLP, UNets: + res-block convs), attention + MLP "
                               "only, attention only, or none (only include_patterns). Embedders, final layers and "
                               "modulation (adaLN) never train unless named in include_patterns (as musubi-tuner / "
                               "ai-toolkit do)."),
        io.String.Input("include_patterns", default="",
                        tooltip="Extra layers: regular expressions on module names, comma or newline separated, "
                                "e.g. 'proj_in, time_embed'."),
        io.String.Input("exclude_patterns", default="",
                        tooltip="Layers to leave out (wins over preset and include), e.g. "
                                "'single_blocks\\.(3[0-7])\\.'."),
        io.Boolean.Input("train_norms_and_biases", default=False,
                         tooltip="Also train norm weights and the biases of adapted layers (small; can help style "
                                 "LoRAs)."),
        io.Int.Input("lokr_factor", default=-1, min=-1, max=256,
                     tooltip="LoKr: Kronecker factor of the first dimension (-1 = balanced)."),
        io.Int.Input("oft_block_size", default=32, min=2, max=1024,
                     tooltip="OFT block size as LyCORIS' dim and ComfyUI's trainer rank mean it: each layer's output "
                             "channels split by factorization(channels, this), the smaller factor being the block "
                             "size (32: 1280 channels in 40 blocks of 32, 320 in 20 blocks of 16)."),
        io.Combo.Input("lora_dtype", options=list(LORA_DTYPES), default="bf16",
                       tooltip="Dtype of the output LoRA tensors (training itself keeps float32 weights). bf16 "
                               "halves the file; fp32 keeps every bit."),
        io.String.Input("checkpoint_prefix", default="checkpoints/lora",
                        tooltip="File prefix inside models/loras/ of the checkpoints save_every_steps and a cancel "
                                "write."),
        io.Int.Input("validation_every_steps", default=0, min=0, max=100000,
                     tooltip="Every N steps, the loss on the first samples at fixed noise (comparable across "
                             "steps; 0 = off)."),
        io.Int.Input("validation_samples", default=4, min=1, max=1000,
                     tooltip="How many samples the validation loss uses."),
    ]


def memory_setting_inputs() -> list:
    """Precision and the memory savers (the VRAM guide in the README)."""
    return [
        io.Combo.Input("training_dtype", options=["bf16", "fp16", "fp32", "none"], default="bf16",
                       tooltip="Compute dtype of the forward pass. bf16 on modern GPUs; fp16 for older ones (loss "
                               "scaling on); fp32 slow but exact; none = the model's own dtype (quantized models, "
                               "with bypass_mode)."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute blocks in the backward pass instead of keeping their activations: far "
                                 "less memory, slower by up to one extra forward pass (see checkpoint_policy). Keep "
                                 "on unless memory is plentiful."),
        io.Combo.Input("checkpoint_policy", options=list(CHECKPOINT_POLICIES), default="auto",
                       tooltip="With gradient_checkpointing on. auto: the first step measures each block; blocks "
                               "then keep their activations, cheapest memory per compute first, up to the size of "
                               "the model's weights and at most half the free memory, and only the rest is "
                               "recomputed. all_blocks: recompute every block (least memory, slowest). With "
                               "offloading every block is recomputed."),
        io.Int.Input("checkpoint_depth", default=1, min=1, max=5,
                     tooltip="1 = checkpoint each block of the model's block lists; 2+ = their sub-blocks instead "
                             "(for very large blocks)."),
        io.Boolean.Input("offloading", default=False,
                         tooltip="Keep frozen weights in system RAM and stream them to the GPU layer by layer: "
                                 "trains models larger than VRAM, slower. Needs gradient_checkpointing."),
        io.Boolean.Input("bypass_mode", default=True,
                         tooltip="On (default): adapters run beside each layer (forward hooks), base weights are "
                                 "never rebuilt as W + dW: the fastest way to train, and needed for FP8/FP4 "
                                 "(quantized) models. Off: W + dW is rebuilt every step (the built-in trainer's "
                                 "way; same result, slower)."),
        io.Boolean.Input("quantized_backward", default=False,
                         tooltip="With training_dtype 'none' on a quantized model: run the backward matmuls in the "
                                 "quantized format too (less memory, a bit less exact)."),
        io.Boolean.Input("bucket_mode", default=True,
                         tooltip="On: latents of different sizes train in batches of one size each. Off: with "
                                 "mixed sizes, each sample of a batch runs on its own (as ComfyUI's trainer does): "
                                 "same result, lower peak memory, slower."),
    ]


def defaults(inputs: list) -> dict:
    return {i.id: i.default for i in inputs if getattr(i, "default", None) is not None}


class TrainingSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "TrainingSettings",
            display_name="LoRA Training Settings",
            category=CATEGORY,
            description="The finer knobs of Train LoRA: loss, noise levels, learning-rate schedule, which layers "
                        "train, output dtype, checkpoint names, validation. Connect to Train LoRA's 'settings'; "
                        "without it Train LoRA uses these defaults.",
            search_aliases=["lora settings", "training settings", "advanced training"],
            inputs=training_setting_inputs(),
            outputs=[TRAINING_SETTINGS.Output(display_name="settings",
                                              tooltip="Connect to Train LoRA's 'settings' input.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput({**defaults(training_setting_inputs()), **values})


class MemorySettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "MemorySettings",
            display_name="LoRA Memory Settings",
            category=CATEGORY,
            description="Precision and memory savers for Train LoRA: compute dtype, gradient checkpointing, "
                        "offloading, bypass adapters (FP8/FP4 models), bucketing. Connect to Train LoRA's "
                        "'memory' input; without it Train LoRA uses these defaults.",
            search_aliases=["low vram", "memory settings", "gradient checkpointing", "offloading"],
            inputs=memory_setting_inputs(),
            outputs=[MEMORY_SETTINGS.Output(display_name="memory",
                                            tooltip="Connect to Train LoRA's 'memory' input.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput({**defaults(memory_setting_inputs()), **values})


def merged_values(own_inputs: list, given: dict, single) -> dict:
    """Every setting Train LoRA needs: defaults, then the connected settings nodes' values, then the
    node's own widgets (and, for Python callers, any setting given by name)."""
    settings_defaults = {**defaults(training_setting_inputs()), **defaults(memory_setting_inputs())}
    values = {**defaults(own_inputs), **settings_defaults}
    given = {name: single(value) for name, value in given.items() if value is not None}
    for socket in ("settings", "memory"):
        group = given.pop(socket, None)
        if group is not None:
            values.update(group)
    own = {i.id for i in own_inputs}
    unknown = sorted(set(given) - own - set(settings_defaults))
    if unknown:
        raise UserInputError(
            f"Train LoRA has no setting {', '.join(unknown)}: the settings are those of Train LoRA, LoRA Training "
            f"Settings and LoRA Memory Settings."
        )
    values.update(given)
    return values


NODES = [TrainingSettings, MemorySettings]
