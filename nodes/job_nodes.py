"""Export Training Job: Train LoRA's inputs written to a job folder for `headless.py` / torchrun.

Why a folder and not the workflow itself (see README "Bigger runs"): the dataset is encoded once
here and every rank reads the same bytes, the runner needs no executor, server or node graph, and
what a job holds (model reference, dataset, TrainConfig, output names) is checked on export.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from comfy_api.latest import io, ui

from ..lora_core.data.paths import resolve_inside
from ..lora_core.errors import UserInputError
from ..lora_core.lorafile.resume import sidecar_path
from ..lora_core.training.job import write_job
from . import comfy_glue as glue
from . import job_glue
from .lists import single
from .training_nodes import TrainLoRA, training_inputs

log = logging.getLogger(__name__)

CATEGORY = "LoRA Trainer/training"
PREFIX = "LoRATrainer_"
JOBS_FOLDER = "training_jobs"  # under ComfyUI's output/
START_LORA = "start_lora.safetensors"
# Settings recorded for the output file's metadata and the runner (Train LoRA widgets not in TrainConfig).
JOB_SETTINGS = ("lora_dtype", "quantized_backward", "bucket_mode", "existing_lora", "checkpoint_prefix")


class ExportTrainingJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        train = TrainLoRA.define_schema()
        return io.Schema(
            node_id=PREFIX + "ExportTrainingJob",
            display_name="Export Training Job",
            category=CATEGORY,
            description="Write what Train LoRA would train (dataset, model file names, every setting) to a job "
                        "folder under output/training_jobs/, to train it headless or on several GPUs with "
                        "torchrun: the same settings give the same LoRA.",
            search_aliases=["headless", "multi gpu", "torchrun", "export job"],
            is_input_list=True,
            is_output_node=True,
            inputs=[
                *train.inputs[:3],
                io.String.Input("job_name", default="lora_job",
                                tooltip="Folder under output/training_jobs/ (subfolders allowed)."),
                io.String.Input("lora_prefix", default="trained_lora",
                                tooltip="File name prefix of the trained LoRA inside models/loras/, as in Save LoRA "
                                        "Weights."),
                io.String.Input("chart_prefix", default="loss_graph",
                                tooltip="Loss chart name prefix under output/, as in Plot Loss Graph."),
                io.Boolean.Input("kohya_export", default=False,
                                 tooltip="Also write a kohya-named copy of the LoRA (as Save LoRA Weights does)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing job folder of that name (only a job folder is replaced)."),
                *train.inputs[3:],
            ],
            outputs=[io.String.Output(display_name="job_folder", tooltip="Full path of the written job folder.")],
        )

    @classmethod
    def execute(cls, model, latents, positive, job_name, lora_prefix, chart_prefix, kohya_export, overwrite,
                **widgets) -> io.NodeOutput:
        model, data, config, values = training_inputs(model, latents, positive, widgets)
        reference, extra_files = job_glue.model_reference(model)
        start_lora = None
        if values["existing_lora"] and values["existing_lora"] != glue.NO_LORA:
            extra_files.update(_start_lora_files(glue.lora_path(values["existing_lora"])))
            start_lora = START_LORA
        root = glue.output_directory() / JOBS_FOLDER
        folder = resolve_inside(root, single(job_name).strip(), "job folder")
        if Path(folder) == root:
            raise UserInputError("job_name is empty: give the job a folder name, e.g. 'my_lora_job'.")
        output = {"lora_prefix": single(lora_prefix), "chart_prefix": single(chart_prefix),
                  "kohya_export": bool(single(kohya_export)), "log_scale": False}
        write_job(folder, reference, config, data.latents, data.conds,
                  settings={name: values[name] for name in JOB_SETTINGS}, output=output,
                  extra_files=extra_files, start_lora=start_lora, overwrite=bool(single(overwrite)))
        message = (f"Job written to {folder}\nRun it: python headless.py {folder} --comfyui /path/to/ComfyUI\n"
                   f"or on N GPUs: torchrun --nproc-per-node N headless.py {folder} --comfyui /path/to/ComfyUI")
        log.info("[LoRA Trainer] %s", message)
        return io.NodeOutput(str(folder), ui=ui.PreviewText(message))


def _start_lora_files(path: Path) -> dict:
    """The LoRA the job continues, with its optimizer state when it has one."""
    files = {START_LORA: lambda target: shutil.copyfile(path, target)}
    if sidecar_path(path).is_file():
        files[sidecar_path(Path(START_LORA)).name] = lambda target: shutil.copyfile(sidecar_path(path), target)
    return files


NODES = [ExportTrainingJob]
