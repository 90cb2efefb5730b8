"""A training job folder: what a headless run needs to train exactly what the graph would have.

    job.json                 format + version, the model reference, the full TrainConfig, the node
                             settings that shape the output file, where and how outputs are named
    dataset/                 the training samples as a saved dataset (data/saved_dataset.py), one
                             entry per sample exactly as Train LoRA would see them, in order
    <extra files>            written by whoever exports the job (e.g. a model-sampling patch, the
                             LoRA a run continues); job.json names them
    run_state.json           written by the runner: the last checkpoint and the loss so far, so a
                             restarted run continues where it stopped

The model reference is a dict lora_core never interprets: the loader that made it reads it back
(the ComfyUI glue: file names in ComfyUI's model folders, weight dtype, model-sampling patch;
`lora_core.toy`: a toy denoiser's seed and parametrisation, for tests).
The folder is written completely or not at all (data/atomic_folder.py); it holds no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import AdapterSpec
from ..adapters.targets import TargetSpec
from ..atomic import write_bytes_atomically
from ..data.atomic_folder import write_folder
from ..data.dataset_reader import load_dataset
from ..data.saved_dataset import SampleInfo, SaveOptions, save_dataset
from ..errors import UserInputError
from .loop import TrainConfig, TrainingData
from .objectives import ObjectiveConfig

FORMAT_NAME = "comfyui-lora-trainer.job"
FORMAT_VERSION = 1
JOB_FILE = "job.json"
DATASET_FOLDER = "dataset"
RUN_STATE = "run_state.json"

# What the output files are called when job.json does not say (Save LoRA Weights / Plot Loss Graph defaults).
DEFAULT_OUTPUT = {"lora_prefix": "trained_lora", "chart_prefix": "loss_graph", "kohya_export": False,
                  "log_scale": False}


@dataclass
class TrainingJob:
    folder: Path
    model: dict                       # the loader's reference (see module docstring)
    config: TrainConfig               # the engine config, as Train LoRA computed it
    settings: dict = field(default_factory=dict)   # node-only settings recorded in the file's metadata
    output: dict = field(default_factory=lambda: dict(DEFAULT_OUTPUT))
    start_lora: str | None = None     # file in the job folder to continue from (with its .optim)

    @property
    def dataset_folder(self) -> Path:
        return self.folder / DATASET_FOLDER

    def path(self, name: str) -> Path:
        """A file named in job.json, refused if it leads outside the job folder."""
        full = (self.folder / name).resolve()
        if self.folder.resolve() not in full.parents:
            raise UserInputError(f"{self.folder / JOB_FILE} names {name!r}, outside the job folder: export the job again.")
        return full

    def training_data(self) -> TrainingData:
        samples = load_dataset(self.folder, DATASET_FOLDER)
        weights = samples.weights
        return TrainingData(latents=samples.latents, conds=samples.conds,
                            weights=None if all(w == 1.0 for w in weights) else weights)


# ---- TrainConfig <-> JSON ----------------------------------------------------------------------
_NESTED = {"objective": ObjectiveConfig, "adapter": AdapterSpec, "targets": TargetSpec}


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict, where: str = JOB_FILE) -> TrainConfig:
    """The TrainConfig `config_to_dict` wrote; unknown fields mean a newer pack wrote the job."""
    if not isinstance(values, dict):
        raise UserInputError(f"{where}: train_config is not an object: export the job again.")
    values = dict(values)
    for name, kind in _NESTED.items():
        if name in values:
            values[name] = _build(kind, values[name], f"{where}: train_config.{name}")
    return _build(TrainConfig, values, f"{where}: train_config")


def _build(kind, values, where: str):
    if not isinstance(values, dict):
        raise UserInputError(f"{where} is not an object: export the job again.")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"{where} has settings this version does not know ({', '.join(unknown)}): "
                             "update the node pack on this machine to the version that exported the job.")
    return kind(**values)


# ---- writing and reading -----------------------------------------------------------------------
def write_job(
    folder: str | os.PathLike,
    model: dict,
    config: TrainConfig,
    latents: list,
    conds: list,
    settings: dict | None = None,
    output: dict | None = None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    start_lora: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the job folder. `conds`: one per latent or one for all. `extra_files`: name -> writer(path).

    An existing folder is replaced only with `overwrite` and only if it is a job folder.
    """
    folder = Path(folder)
    if len(conds) not in (1, len(latents)):
        raise UserInputError(f"{len(latents)} latents but {len(conds)} conditionings: give one per latent or one for all.")
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model,
        "train_config": config_to_dict(config),
        "settings": settings or {},
        "output": {**DEFAULT_OUTPUT, **(output or {})},
        "start_lora": start_lora,
    }
    text = json.dumps(document, indent=1, sort_keys=True, default=_not_json)

    def write(partial: Path) -> None:
        # One entry per sample, repeats 1: the batch plan then visits exactly what Train LoRA visits.
        save_dataset(partial, DATASET_FOLDER, list(latents), list(conds),
                     [SampleInfo() for _ in latents], SaveOptions(overwrite=False))
        for name, writer in (extra_files or {}).items():
            writer(partial / name)
        (partial / JOB_FILE).write_text(text, encoding="utf-8")

    return write_folder(folder, write, overwrite, _is_job_folder, f"Job folder {folder}")


def _not_json(value):
    raise UserInputError(f"The job cannot record a {type(value).__name__} ({value!r}): only plain settings can "
                         "be exported.")


def _is_job_folder(folder: Path) -> bool:
    return (folder / JOB_FILE).is_file()


def read_job(folder: str | os.PathLike) -> TrainingJob:
    folder = Path(folder)
    path = folder / JOB_FILE
    if not path.is_file():
        raise UserInputError(f"{folder} has no {JOB_FILE}: give the folder written by Export Training Job.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path} cannot be read ({error}): copy the job folder again.") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise UserInputError(f"{path} is not a LoRA Trainer job file: give the folder written by Export Training Job.")
    if document.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"{path} has job format version {document.get('format_version')}, this pack reads "
                             f"{FORMAT_VERSION}: use the pack version that exported it.")
    if not isinstance(document.get("model"), dict) or "kind" not in document["model"]:
        raise UserInputError(f"{path} has no model reference: export the job again.")
    if not (folder / DATASET_FOLDER).is_dir():
        raise UserInputError(f"{folder} has no {DATASET_FOLDER}/ folder: copy the whole job folder, not only {JOB_FILE}.")
    return TrainingJob(
        folder=folder,
        model=document["model"],
        config=config_from_dict(document.get("train_config"), str(path)),
        settings=dict(document.get("settings") or {}),
        output={**DEFAULT_OUTPUT, **(document.get("output") or {})},
        start_lora=document.get("start_lora"),
    )


# ---- run state: where a restarted run continues --------------------------------------------------
def read_run_state(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / RUN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path} cannot be read ({error}): delete it to start the job from the beginning, "
                             "or pass --fresh.") from error
    if not isinstance(state, dict):
        raise UserInputError(f"{path} is damaged: delete it or pass --fresh to start from the beginning.")
    return state


def write_run_state(folder: str | os.PathLike, state: dict) -> Path:
    return write_bytes_atomically(Path(folder) / RUN_STATE, json.dumps(state, indent=1).encode())
