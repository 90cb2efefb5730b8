"""Train LoRA: widgets (plus the settings nodes' values, see training_settings) -> `TrainConfig`,
dataset lists -> `TrainingData`, then lora_core's `train` inside a ComfyUI training session (see
comfy_glue). Checkpoints (every N steps, on cancel, on a
non-finite loss) go to the loras folder so `existing_lora` can continue from them.
"""

from __future__ import annotations

import importlib.util
import logging
from PIL import Image
from comfy_api.latest import io

from ..lora_core.lorafile import resume
from ..lora_core.adapters import AdapterSpec
from ..lora_core.errors import UserInputError
from ..lora_core.lorafile.lora_model import LoraModel
from ..lora_core.training.objectives import ObjectiveConfig
from ..lora_core.plotting import loss_chart_png
from ..lora_core.training.schedule import check_scheduler
from ..lora_core.adapters.targets import TargetSpec
from ..lora_core.training.loop import (NonFiniteLoss, TrainCallbacks, TrainConfig, TrainingData,
                                 TrainResult, train)
from . import comfy_glue as glue
from .lists import single, training_samples
from .lora_nodes import LORA_MODEL, LOSS_MAP, relative_lora_name, write_lora
from .outputs import NODE_ONLY_SETTINGS, lora_output  # noqa: F401 (re-exported)
from .training_settings import NODES as SETTINGS_NODES
from .training_settings import LORA_DTYPES, LOSS_LABELS, MEMORY_SETTINGS, TRAINING_SETTINGS, merged_values  # noqa: F401

log = logging.getLogger(__name__)

CATEGORY = "LoRA Trainer/training"
PREFIX = "LoRATrainer_"

OPTIMIZER_LABELS = {"AdamW": "adamw", "Adam": "adam", "SGD": "sgd", "RMSprop": "rmsprop", "Adafactor": "adafactor"}
# Offered only when their package is installed: label -> (engine name, import name).
OPTIONAL_OPTIMIZER_LABELS = {"Prodigy": ("prodigy", "prodigyopt"), "Lion": ("lion", "lion_pytorch"),
                             "AdamW8bit": ("adamw8bit", "bitsandbytes")}
ALGORITHM_LABELS = {"LoRA": "lora", "LoHa": "loha", "LoKr": "lokr", "OFT": "oft"}


def optimizer_labels() -> list[str]:
    labels = list(OPTIMIZER_LABELS)
    labels += [label for label, (_, module) in OPTIONAL_OPTIMIZER_LABELS.items()
               if importlib.util.find_spec(module) is not None]
    return labels


def optimizer_name(label: str) -> str:
    if label in OPTIMIZER_LABELS:
        return OPTIMIZER_LABELS[label]
    if label in OPTIONAL_OPTIMIZER_LABELS:
        return OPTIONAL_OPTIMIZER_LABELS[label][0]
    return label


def patterns(text: str) -> list[str]:
    """Comma- or newline-separated regular expressions."""
    return [p.strip() for chunk in text.splitlines() for p in chunk.split(",") if p.strip()]


def train_config(v: dict, mixed_sizes: bool) -> TrainConfig:
    """The engine's config from the widget values (validated there)."""
    batch_size, accumulation = v["batch_size"], v["grad_accumulation_steps"]
    if mixed_sizes and not v["bucket_mode"] and batch_size > 1:
        # ComfyUI's trainer runs mixed sizes one sample at a time: same gradient, flat memory.
        batch_size, accumulation = 1, batch_size * accumulation
    return TrainConfig(
        steps=v["steps"],
        batch_size=batch_size,
        grad_accumulation_steps=accumulation,
        learning_rate=v["learning_rate"],
        optimizer=optimizer_name(v["optimizer"]),
        weight_decay=v["weight_decay"],
        lr_scheduler=check_scheduler(v["lr_scheduler"]),
        warmup_steps=v["warmup_steps"],
        loraplus_ratio=v["loraplus_ratio"],
        max_grad_norm=v["max_grad_norm"],
        objective=ObjectiveConfig(
            target=v["objective"],
            timestep_sampling=v["timestep_sampling"],
            shift=v["timestep_shift"],
            loss_weighting=v["loss_weighting"],
            min_snr_gamma=v["min_snr_gamma"],
            loss_function=LOSS_LABELS.get(v["loss_function"], v["loss_function"]),
            noise_offset=v["noise_offset"],
            min_noise_level=v["min_noise_level"],
            max_noise_level=v["max_noise_level"],
        ),
        adapter=AdapterSpec(
            algorithm=ALGORITHM_LABELS.get(v["algorithm"], v["algorithm"]),
            rank=v["rank"],
            alpha=v["alpha"],
            lokr_factor=v["lokr_factor"],
            oft_block_size=v["oft_block_size"],
        ),
        targets=TargetSpec(
            preset=v["target_preset"],
            include=patterns(v["include_patterns"]),
            exclude=patterns(v["exclude_patterns"]),
            train_norms_and_biases=v["train_norms_and_biases"],
        ),
        seed=v["seed"],
        training_dtype=v["training_dtype"],
        bypass=v["bypass_mode"],
        gradient_checkpointing=v["gradient_checkpointing"],
        checkpoint_depth=v["checkpoint_depth"],
        checkpoint_policy=v["checkpoint_policy"],
        offloading=v["offloading"],
        save_every_steps=v["save_every_steps"],
        validation_every_steps=v["validation_every_steps"],
        validation_samples=v["validation_samples"],
    )


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "TrainLoRA",
            display_name="Train LoRA",
            category=CATEGORY,
            description="Train a LoRA / LoHa / LoKr / OFT adapter on the model from latents and their captions. "
                        "Shows the loss and a live chart; cancel keeps a checkpoint in the loras folder.",
            search_aliases=["train lora", "finetune", "lycoris"],
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to train on (from your checkpoint / UNet loader; "
                                                "LoRAs already applied stay applied and are trained on top)."),
                io.Latent.Input("latents", tooltip="Training latents: Make Training Dataset, Load Training Dataset or "
                                                   "Resolution Bucket. Mixed sizes train in per-size batches."),
                io.Conditioning.Input("positive", tooltip="One conditioning per latent (same order), or a single one "
                                                          "for every latent."),
                io.Int.Input("steps", default=200, min=1, max=100000,
                             tooltip="Optimizer steps in this run (100-2000 typical). Resumed runs add to the total."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Samples per forward pass (1-4 on consumer GPUs). Memory grows with it."),
                io.Float.Input("learning_rate", default=0.0005, min=0.0000001, max=1.0, step=0.000001,
                               tooltip="Step size: 1e-4..5e-4 with the default alpha = rank (scale 1); with "
                                       "alpha 1 and rank 8 (scale 1/8, kohya-ss style) use about 8x more. Prodigy "
                                       "wants 1.0."),
                io.Int.Input("rank", default=8, min=1, max=256,
                             tooltip="Adapter size: 4-32 for a subject or style, higher for more detail "
                                     "(bigger file)."),
                io.Float.Input("alpha", default=8.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="LoRA / LoHa / LoKr scale = alpha / rank. 8 (default, = the default rank) "
                                       "gives scale 1, the PEFT/diffusers convention: at the same learning rate it "
                                       "moves the model about as far per step as ComfyUI's trainer does with its "
                                       "alpha 1 and random-up init. If you raise rank, raise alpha with it to keep "
                                       "the same speed. OFT: the constraint, 0 = none."),
                io.Combo.Input("algorithm", options=list(ALGORITHM_LABELS), default="LoRA",
                               tooltip="LoRA: standard, recommended. LoHa: Hadamard product, more expressive per "
                                       "parameter. LoKr: Kronecker product, smallest files. OFT: orthogonal "
                                       "fine-tuning, keeps the model's style stable."),
                io.Combo.Input("optimizer", options=optimizer_labels(), default="AdamW",
                               tooltip="AdamW is the safe choice. Prodigy / Lion / AdamW8bit appear when their "
                                       "package is installed."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds adapter init, noise, timesteps and batch order: the same seed and "
                                     "inputs give the same LoRA on CPU."),
                io.Combo.Input("existing_lora", options=[glue.NO_LORA] + glue.lora_names(), default=glue.NO_LORA,
                               tooltip="Continue training this LoRA file (step count, settings and optimizer state "
                                       "from the file). [None] = start a new LoRA."),
                io.Int.Input("save_every_steps", default=0, min=0, max=100000,
                             tooltip="Write a checkpoint to models/loras/ every N steps (0 = only on cancel and "
                                     "errors); the file prefix is in LoRA Training Settings."),
                TRAINING_SETTINGS.Input("settings", optional=True,
                                        tooltip="From LoRA Training Settings: loss, noise levels, learning-rate "
                                                "schedule, target layers, output dtype, validation. Unconnected: "
                                                "that node's defaults."),
                MEMORY_SETTINGS.Input("memory", optional=True,
                                      tooltip="From LoRA Memory Settings: compute dtype, gradient checkpointing, "
                                              "offloading, bypass adapters, bucketing. Unconnected: that node's "
                                              "defaults (bf16, checkpointing auto, bypass on)."),
            ],
            outputs=[
                LORA_MODEL.Output(display_name="lora", tooltip="The trained LoRA weights (with metadata)."),
                LOSS_MAP.Output(display_name="loss_map", tooltip="Loss per step (plus validation loss, lr)."),
                io.Int.Output(display_name="steps", tooltip="Total steps, including steps of a resumed LoRA."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, **inputs) -> io.NodeOutput:
        return run_training(*training_inputs(model, latents, positive, inputs))


def training_inputs(model, latents, positive, inputs: dict) -> tuple[object, TrainingData, TrainConfig, dict]:
    """(model, data, engine config, every setting) from Train LoRA's list inputs (its settings nodes'
    values merged in); Export Training Job takes the same inputs through here, so a job trains what
    the node would."""
    values = merged_values(TrainLoRA.define_schema().inputs, inputs, single)
    glue.check_trainable(single(model))  # before the dataset is read: audio / 3D latents would fail there
    samples, conds = training_samples(latents, positive)
    mixed_sizes = len({tuple(x.shape) for x in samples}) > 1
    config = train_config(values, mixed_sizes)
    return single(model), TrainingData(latents=samples, conds=conds), config, values


def run_training(model, data: TrainingData, config: TrainConfig, v: dict) -> io.NodeOutput:
    glue.check_trainable(model)  # first: a family we cannot train is named before anything loads
    base_model = glue.base_model_name(model)
    checkpoints = CheckpointWriter(config, v, base_model)
    fp8_backward = glue.low_vram_check(model, config, v["quantized_backward"]).fp8_backward
    with glue.training_session(model, config.offloading, fp8_backward) as denoiser:
        checkpoints.prediction_type = denoiser.prediction_type
        resume = load_resume(v["existing_lora"], denoiser, config)
        start = resume.steps_done if resume is not None else 0
        history: list[float] = []
        progress = glue.TrainingProgress(config.steps, chart=_chart)

        def on_step(step: int, loss: float, lr: float) -> None:
            history.append(loss)
            progress.update(step - start, loss, history, lr=lr)

        callbacks = TrainCallbacks(on_step=on_step, should_stop=glue.processing_interrupted,
                                   on_checkpoint=checkpoints.on_checkpoint)
        try:
            result = train(denoiser, data, config, callbacks, resume)
        except NonFiniteLoss as stop:
            path = checkpoints.write_result(stop.result)
            raise UserInputError(f"{stop} Last good weights: loras/{path}.") from stop
        lora = lora_output(result, config, v, base_model, denoiser.prediction_type, glue.kohya_naming(model))
    if result.stopped_early:
        path = checkpoints.write(lora, result.total_steps)
        log.info("[LoRA Trainer] cancelled at step %d; checkpoint %s", result.total_steps, path)
        glue.raise_if_interrupted()
    return io.NodeOutput(lora, result.loss_map(), result.total_steps)


def _chart(history: list[float]) -> Image.Image:
    return glue.png_to_pil(loss_chart_png(history, title=f"Training loss ({len(history)} steps)"))


def load_resume(name: str, denoiser, config: TrainConfig):
    if not name or name == glue.NO_LORA:
        return None
    aliases = glue.lora_key_aliases(denoiser.patcher)
    return resume.resume_from_file(glue.lora_path(name), denoiser, config, aliases)


class CheckpointWriter:
    """Writes LoRA checkpoints (with optimizer state) into the loras folder during and after a run."""

    def __init__(self, config: TrainConfig, values: dict, base_model: str):
        self.config = config
        self.values = values
        self.base_model = base_model
        self.prediction_type = ""

    def on_checkpoint(self, step: int, adapter_set, optimizer_state: dict) -> None:
        result = TrainResult(adapter_set, [], [], [], [], step, optimizer_state)
        path = self.write_result(result)
        glue.send_text(f"checkpoint at step {step}: loras/{path}")

    def write_result(self, result: TrainResult) -> str:
        lora = lora_output(result, self.config, self.values, self.base_model, self.prediction_type)
        return self.write(lora, result.total_steps)

    def write(self, lora: LoraModel, steps: int) -> str:
        return relative_lora_name(write_lora(lora, self.values["checkpoint_prefix"], steps))


NODES = [TrainLoRA, *SETTINGS_NODES]
