"""Headless training: a job folder (Export Training Job) trained without a browser, alone or as one
rank of a `torchrun` group. Started through the entry script `headless.py` at the pack's root.

What a run does, in order:
1. join the torchrun group when launched by it (`lora_core.training.distributed`; CUDA device per
   LOCAL_RANK before anything is loaded), else train alone;
2. every rank reads the job and loads the model with ComfyUI's own loaders (`job_glue`, ComfyUI
   imported as a library from --comfyui, no server) or, for test jobs, a toy denoiser; a failure
   on any rank ends every rank with that rank's message (`DataParallel.agree`);
3. rank 0 decides where to start: the checkpoint named in the job's run_state.json (a restart after
   a crash or Ctrl-C), the LoRA the job continues, or nothing; every rank gets it from rank 0;
4. train with the engine the Train LoRA node runs; rank 0 shows a progress bar and a log line every
   --log-every steps, and writes checkpoints (save_every_steps) with run_state.json beside them;
5. rank 0 writes the LoRA (+ .optim) and the loss chart as Save LoRA Weights and Plot Loss Graph
   name and fill them (`outputs.py`), and marks the job finished.

Ctrl-C (SIGINT) or SIGTERM stops every rank after the current step and writes a checkpoint, as
cancel does in the graph; the same command continues from it. Checkpoints keep float32 tensors
(whatever lora_dtype says) so a continued run equals an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from ..lora_core.errors import TrainingStopped, UserInputError
from ..lora_core.lorafile.files import load_lora
from ..lora_core.lorafile.keys import KohyaNaming
from ..lora_core.lorafile.resume import load_optimizer_state, resume_point, sidecar_path, steps_done
from ..lora_core.training.distributed import DataParallel, ReplicaFailed
from ..lora_core.training.job import TrainingJob, read_job, read_run_state, write_run_state
from ..lora_core.training.loop import NonFiniteLoss, TrainCallbacks, TrainConfig, TrainResult, train
from .outputs import lora_output, write_lora_file, write_loss_graph

log = logging.getLogger("lora_trainer.headless")

EXIT_USER_ERROR = 2
EXIT_STOPPED = 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="headless.py",
        description="Train a job folder written by Export Training Job. Alone: python headless.py JOB --comfyui "
                    "PATH. On N GPUs: torchrun --nproc-per-node N headless.py JOB --comfyui PATH.")
    parser.add_argument("job", type=Path, help="the job folder (Export Training Job's output)")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_ROOT"),
                        help="ComfyUI folder whose loaders and model folders are used (default: $COMFYUI_ROOT)")
    parser.add_argument("--comfyui-args", default="",
                        help="ComfyUI command-line flags, e.g. \"--cpu\" or \"--base-directory /data/comfy\"")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="write the LoRA, checkpoints and chart here instead of ComfyUI's loras/ and output/")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per step over all processes (default: the job's batch_size); changes the result")
    parser.add_argument("--log-every", type=int, default=10, help="a log line every N steps (default 10)")
    parser.add_argument("--fresh", action="store_true", help="ignore run_state.json and start from the beginning")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, only log lines")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a rank waits for the others in one collective before failing (default 1800)")
    args = parser.parse_args(argv)
    if args.log_every < 1:
        parser.error("--log-every must be 1 or more")
    return args


# ---- stopping -----------------------------------------------------------------------------------
class StopRequest:
    """SIGINT / SIGTERM ask for a stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (%s): finishing the current step, then writing a checkpoint "
                    "(Ctrl-C again stops at once, without one)", signal.Signals(signum).name)

    def __call__(self) -> bool:
        return self.requested


# ---- progress -----------------------------------------------------------------------------------
class Progress:
    """tqdm bar (when installed and wanted) plus a log line every `every` steps."""

    def __init__(self, start: int, total: int, every: int, bar: bool):
        self.start, self.total, self.every = start, total, every
        self.started = time.monotonic()
        self.bar = None
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="training")

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if step % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else math.nan
            self.write(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.3f} steps/s  "
                       f"eta {_duration(eta)}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ---- model backends -----------------------------------------------------------------------------
class ToyBackend:
    """Jobs on `lora_core.toy` denoisers (tests, benches): no ComfyUI needed."""

    def __init__(self, args: argparse.Namespace, job: TrainingJob):
        self.lora_root = self.output_dir = args.output_dir or job.folder / "output"
        self.kohya_naming = None  # set when the model is open: the kohya export names its layers
        self.key_aliases = {}  # other names of the model's layers, for continuing foreign files

    @contextlib.contextmanager
    def open(self, job: TrainingJob, config: TrainConfig):
        from ..lora_core.toy import ToyNetConfig, make_toy_denoiser

        reference = job.model
        if os.environ.get("LORA_TRAINER_TEST_FAIL_RANK") == os.environ.get("RANK", "0"):
            raise UserInputError("test: this rank was told to fail loading its model")  # fault-injection for tests
        net = ToyNetConfig(**reference.get("net", {}))
        denoiser = make_toy_denoiser(reference.get("prediction_type", "eps"), reference.get("seed", 0), net)
        self.kohya_naming = KohyaNaming("toy", {name: name for name, _ in denoiser.module.named_modules() if name})
        yield denoiser, f"toy-{denoiser.prediction_type}"


class ComfyBackend:
    """Jobs on ComfyUI models: ComfyUI imported as a library, its loaders and model folders."""

    def __init__(self, args: argparse.Namespace, job: TrainingJob):
        if args.comfyui is None:
            raise UserInputError("This job trains a ComfyUI model: say where ComfyUI is with --comfyui /path/to/ComfyUI "
                                 "(or set COMFYUI_ROOT).")
        setup_comfyui(args.comfyui, args.comfyui_args)
        from . import comfy_glue, job_glue

        self.glue, self.job_glue = comfy_glue, job_glue
        self.lora_root = args.output_dir or comfy_glue.lora_root()
        self.output_dir = args.output_dir or comfy_glue.output_directory()
        self.kohya_naming = None  # set when the model is open: the kohya export names its layers
        self.key_aliases = {}  # other names of the model's layers, for continuing foreign files

    @contextlib.contextmanager
    def open(self, job: TrainingJob, config: TrainConfig):
        model = self.job_glue.load_model(job.model, job.folder)
        self.glue.check_trainable(model)  # as Train LoRA: a family it cannot train is named first
        self.kohya_naming = self.glue.kohya_naming(model)
        self.key_aliases = self.glue.lora_key_aliases(model)
        check = self.glue.low_vram_check(model, config, bool(job.settings.get("quantized_backward", False)))
        with self.glue.training_session(model, config.offloading, check.fp8_backward) as denoiser:
            yield denoiser, self.glue.base_model_name(model)


def setup_comfyui(path: Path, comfy_args: str) -> None:
    """Make ComfyUI at `path` importable as a library, with its command-line flags and model folders."""
    root = Path(path).expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file() or not (root / "folder_paths.py").is_file():
        raise UserInputError(f"--comfyui {path} is not a ComfyUI folder (no comfy/model_management.py): give the "
                             "folder that holds ComfyUI's main.py.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.cli_args" in sys.modules:
        raise UserInputError("ComfyUI was imported before the runner could pass it --comfyui-args: start the runner "
                             "in a fresh Python process.")
    # ComfyUI's own parser and its post-processing read the flags, exactly as main.py would.
    import comfy.options

    argv = sys.argv
    sys.argv = ["main.py", *shlex.split(comfy_args)]
    comfy.options.enable_args_parsing(True)
    try:
        import comfy.cli_args as cli
    except SystemExit as error:
        raise UserInputError(f"--comfyui-args {comfy_args!r} holds a flag ComfyUI does not know (see "
                             "python main.py --help in the ComfyUI folder).") from error
    finally:
        sys.argv = argv
        comfy.options.enable_args_parsing(False)
    import folder_paths  # reads --base-directory and friends on import
    from utils.extra_config import load_extra_path_config

    extra = root / "extra_model_paths.yaml"
    if extra.is_file():
        load_extra_path_config(str(extra))
    for group in cli.args.extra_model_paths_config or []:
        for config_path in group:
            load_extra_path_config(config_path)
    log.info("ComfyUI %s, models in %s", root, folder_paths.models_dir)


# ---- where a run starts ---------------------------------------------------------------------------
def start_point(job: TrainingJob, fresh: bool) -> dict:
    """Rank 0's decision, handed to every rank: finished already, continue a file, or start fresh."""
    state = None if fresh else read_run_state(job.folder)
    if state and state.get("finished"):
        return {"finished": state.get("lora", "")}
    history = {"loss": [], "steps": [], "lr": [], "val": []}
    source, target = None, None
    if state and state.get("checkpoint"):
        source, history, target = Path(state["checkpoint"]), state["history"], state["target_steps"]
        if not source.is_file():
            raise UserInputError(f"run_state.json names the checkpoint {source}, which is gone: restore it, or pass "
                                 "--fresh to start the job from the beginning.")
    elif job.start_lora:
        source = job.path(job.start_lora)
    if source is None:
        return {"file": None, "history": history, "target_steps": job.config.steps}
    tensors, metadata = load_lora(source)
    optimizer_state, optimizer = (load_optimizer_state(sidecar_path(source)) if sidecar_path(source).is_file()
                                  else (None, None))
    if target is None:  # continuing the job's own start LoRA: its steps come first
        target = steps_done(metadata, source.name) + job.config.steps
    return {"file": str(source), "tensors": tensors, "metadata": metadata, "optimizer_state": optimizer_state,
            "optimizer": optimizer, "history": history, "target_steps": target}


def local_progress(job: TrainingJob, fresh: bool) -> tuple[int, int]:
    """(finished, checkpoint step) of this machine's copy of the job, to find the most advanced one."""
    try:
        state = None if fresh else read_run_state(job.folder)
    except UserInputError:
        return (0, -1)
    if not state:
        return (0, -1)
    return (1 if state.get("finished") else 0, int(state.get("step", -1)))


class RunRecord:
    """Rank 0's account of the run: loss history across restarts, checkpoints, run_state.json."""

    def __init__(self, job: TrainingJob, backend, base_model: str, history: dict, target_steps: int,
                 resumed_at: int = 0):
        self.job, self.backend, self.base_model = job, backend, base_model
        self.history = {k: list(v) for k, v in history.items()}
        self.target_steps = target_steps
        self.resumed_at = resumed_at
        self.prediction_type = ""

    def on_step(self, step: int, loss: float, lr: float) -> None:
        self.history["loss"].append(loss)
        self.history["steps"].append(step)
        self.history["lr"].append(lr)

    def on_validation(self, step: int, value: float) -> None:
        # A continued run measures its first step again: keep what an uninterrupted run has.
        every = self.job.config.validation_every_steps
        off_schedule = step == self.resumed_at and step > 0 and every and step % every
        if not off_schedule and not any(s == step for s, _ in self.history["val"]):
            self.history["val"].append([step, value])

    def result(self, adapter_set, step: int, optimizer_state: dict, stopped_early: bool = False) -> TrainResult:
        """A TrainResult over the whole run so far (all segments), as one uninterrupted run reports it."""
        h = self.history
        return TrainResult(adapter_set, list(h["loss"]), list(h["steps"]), list(h["lr"]),
                           [tuple(v) for v in h["val"]], step, optimizer_state, stopped_early)

    def settings(self, lora_dtype: str | None = None) -> dict:
        values = {"lora_dtype": "bf16", "quantized_backward": False, "bucket_mode": True, "existing_lora": "[None]",
                  "checkpoint_prefix": "checkpoints/lora", **self.job.settings}
        if lora_dtype is not None:
            values["lora_dtype"] = lora_dtype
        return values

    def write_checkpoint(self, step: int, adapter_set, optimizer_state: dict, stopped_early: bool = False) -> Path:
        result = self.result(adapter_set, step, optimizer_state, stopped_early)
        values = self.settings(lora_dtype="fp32")  # exact continuation
        lora = lora_output(result, self.job.config, values, self.base_model, self.prediction_type)
        path = write_lora_file(Path(self.backend.lora_root), lora, values["checkpoint_prefix"], step)
        write_run_state(self.job.folder, {"checkpoint": str(path), "step": step, "target_steps": self.target_steps,
                                          "history": self.history})
        return path

    def write_final(self, result: TrainResult) -> tuple[Path, Path]:
        full = self.result(result.adapter_set, result.total_steps, result.optimizer_state)
        lora = lora_output(full, self.job.config, self.settings(), self.base_model, self.prediction_type,
                           self.backend.kohya_naming)
        output = self.job.output
        path = write_lora_file(Path(self.backend.lora_root), lora, output["lora_prefix"], full.total_steps,
                               bool(output.get("kohya_export")))
        chart, _, _ = write_loss_graph(Path(self.backend.output_dir), output["chart_prefix"], full.loss_map(),
                                       bool(output.get("log_scale")))
        write_run_state(self.job.folder, {"finished": True, "lora": str(path), "chart": str(chart),
                                          "target_steps": self.target_steps})
        return path, chart


# ---- the run --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    replica = DataParallel.from_environment(timeout_s=args.timeout)
    main = replica is None or replica.is_main
    _setup_logging(main, replica)
    try:
        with StopRequest() as stop:
            return _run(args, replica, main, stop)
    finally:
        if replica is not None:
            replica.close()


def _run(args: argparse.Namespace, replica: DataParallel | None, main: bool, stop: StopRequest) -> int:
    with contextlib.ExitStack() as stack:
        error = None
        try:
            job = read_job(args.job)
            config = job.config
            if args.batch_size is not None:
                config = dataclasses.replace(config, batch_size=args.batch_size)
            backend = (ComfyBackend if job.model["kind"] == "comfyui" else ToyBackend)(args, job)
            data = job.training_data()
            denoiser, base_model = stack.enter_context(backend.open(job, config))
        except Exception as caught:  # noqa: BLE001 - every rank must hear of it, see agree()
            error = caught
        if replica is not None:
            replica.agree(error, "load the job's model and dataset")
        elif error is not None:
            raise error

        if replica is None:
            start = start_point(job, args.fresh)
        else:
            # After a restart on several machines rank 0 may be on another machine than before: the rank
            # whose job folder is furthest along reads its checkpoint and hands it to all.
            progress_by_rank = replica.gather(local_progress(job, args.fresh))
            source = max(range(replica.world_size), key=lambda r: (progress_by_rank[r], -r))
            start = replica.from_rank(lambda: start_point(job, args.fresh), "read where the job stands", src=source)
        if "finished" in start:
            if main:
                print(f"This job has finished already: {start['finished']}. Pass --fresh to train it again.")
            return 0
        resume = None
        if start["file"] is not None:
            resume = resume_point(start["tensors"], start["metadata"], denoiser, config, start["file"],
                                  start["optimizer_state"], start["optimizer"], backend.key_aliases)
        done = resume.steps_done if resume is not None else 0
        target = start["target_steps"]
        if done >= target:
            raise UserInputError(f"{start['file']} is at step {done}, the job trains to step {target}: nothing left to "
                                 "do; pass --fresh to train it again.")
        config = dataclasses.replace(config, steps=target - done)

        record = RunRecord(job, backend, base_model, start["history"], target, done) if main else None
        progress = Progress(done, target, args.log_every, bar=main and not args.no_progress) if main else None
        if main:
            record.prediction_type = denoiser.prediction_type
            world = replica.world_size if replica is not None else 1
            print(f"training {job.folder.name}: steps {done} -> {target}, batch {config.batch_size} over {world} "
                  f"process(es), base model {base_model}" + (f", continuing {start['file']}" if resume else ""),
                  flush=True)
        callbacks = TrainCallbacks(
            on_step=(lambda s, loss, lr: (record.on_step(s, loss, lr), progress.update(s, loss, lr))) if main else None,
            should_stop=stop,
            on_checkpoint=(lambda s, adapters, state: progress.write(
                f"checkpoint at step {s}: {record.write_checkpoint(s, adapters, state)}")) if main else None,
            on_validation=record.on_validation if main else None,
        )
        try:
            result = train(denoiser, data, config, callbacks, resume, replica=replica)
        except NonFiniteLoss as failure:
            if main:
                r = failure.result
                path = record.write_checkpoint(r.total_steps, r.adapter_set, r.optimizer_state)
                raise UserInputError(f"{failure} Last good weights: {path}") from failure
            raise ReplicaFailed(str(failure)) from failure
        finally:
            if progress is not None:
                progress.close()

        if result.stopped_early:
            if main:
                path = record.write_checkpoint(result.total_steps, result.adapter_set, result.optimizer_state,
                                               stopped_early=True)
                print(f"stopped at step {result.total_steps}; checkpoint {path}\nRun the same command again to "
                      "continue from it.", flush=True)
            return EXIT_STOPPED
        if main:
            lora, chart = record.write_final(result)
            print(f"wrote {lora}\nwrote {chart}", flush=True)
        if replica is not None:
            replica.barrier()  # no rank leaves (and looks failed to torchrun) before rank 0 has written
    return 0


def _setup_logging(main: bool, replica: DataParallel | None) -> None:
    rank = f"[rank {replica.rank}] " if replica is not None else ""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format=f"{rank}%(levelname)s %(name)s: %(message)s", force=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UserInputError, TrainingStopped) as error:
        rank = os.environ.get("RANK")
        # Every rank ends with the same message; print it once (rank 0, or the only process).
        if rank in (None, "0") or not isinstance(error, ReplicaFailed):
            print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped at once, without a checkpoint", file=sys.stderr)
        return EXIT_STOPPED
    except torch.distributed.DistBackendError as error:
        print(f"error: lost contact with another rank ({error.__class__.__name__}); it probably failed: see its "
              "output above. torchrun restarts the job from the last checkpoint if --max-restarts allows.",
              file=sys.stderr)
        return 1
