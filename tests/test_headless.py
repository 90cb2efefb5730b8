"""The headless runner (issue 16) on toy jobs, no ComfyUI: files as the nodes write them, Ctrl-C and
continue, torchrun restarting a killed worker from the last checkpoint, a rank that fails to load.

Every comparison is bit for bit against one uninterrupted in-process run: with lora_dtype fp32 the
file holds the float32 weights, and 2 ranks x batch 2 equal 1 process x batch 2 x 2 accumulation
(tests/test_distributed.py says why).
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core.adapters import AdapterSpec
from lora_core.adapters.targets import TargetSpec
from lora_core.errors import UserInputError
from lora_core.toy import ToyNetConfig, make_toy_denoiser, toy_dataset, write_toy_job
from lora_core.training import job as jobs
from lora_core.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
NET = ToyNetConfig(width=16)
CONFIG = TrainConfig(steps=24, batch_size=4, learning_rate=1e-2, adapter=AdapterSpec(rank=4, alpha=4.0),
                     targets=TargetSpec(preset="all"), training_dtype="fp32", gradient_checkpointing=False,
                     max_grad_norm=1.0, weight_decay=0.01, seed=5, save_every_steps=4, validation_every_steps=8)
SETTINGS = {"lora_dtype": "fp32", "quantized_backward": False, "bucket_mode": True, "existing_lora": "[None]",
            "checkpoint_prefix": "checkpoints/lora"}
IMAGES = 8  # two steps of 4 per epoch: batch 4 is exactly two micro-batches of 2


def make_job(folder: Path, **changes) -> Path:
    path = write_toy_job(folder, dataclasses.replace(CONFIG, **changes), images=IMAGES, seed=2, net=NET)
    document = json.loads((path / jobs.JOB_FILE).read_text())
    document["settings"] = SETTINGS
    (path / jobs.JOB_FILE).write_text(json.dumps(document))
    return path


def reference(**changes) -> dict:
    """The uninterrupted in-process run the job describes (with `changes` to its config)."""
    denoiser = make_toy_denoiser("eps", seed=2, config=NET)
    result = train(denoiser, toy_dataset(IMAGES, seed=2), dataclasses.replace(CONFIG, **changes))
    return {k: v.contiguous() for k, v in result.adapter_set.to_state_dict().items()}


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def headless(job: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "headless.py", str(job), "--no-progress", *args], cwd=ROOT,
                          env=environment(), capture_output=True, text=True, timeout=timeout)


def torchrun(job: Path, *args: str, restarts: int = 0, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--max-restarts", str(restarts), "--monitor-interval", "0.1", "headless.py", str(job),
                             "--no-progress", "--log-every", "1", *args], cwd=ROOT, env=environment(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def only_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, sorted(p.name for p in folder.rglob("*")))
    return found[0]


def metadata_of(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.fixture(scope="module")
def uninterrupted() -> dict:
    return reference()


# ---- the job folder ------------------------------------------------------------------------------
def test_job_folder_round_trips_config_and_samples(tmp_path):
    job = jobs.read_job(make_job(tmp_path / "job"))
    assert job.config == CONFIG and job.model["kind"] == "toy" and job.settings == SETTINGS
    data, original = job.training_data(), toy_dataset(IMAGES, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(data.latents, original.latents))
    assert all(torch.equal(a, b) for a, b in zip(data.conds, original.conds)) and data.weights is None


def test_job_errors_name_the_problem(tmp_path):
    folder = make_job(tmp_path / "job")
    with pytest.raises(UserInputError, match="already exists"):
        make_job(tmp_path / "job")
    document = json.loads((folder / jobs.JOB_FILE).read_text())
    document["train_config"]["warp_drive"] = True
    (folder / jobs.JOB_FILE).write_text(json.dumps(document))
    with pytest.raises(UserInputError, match="warp_drive"):
        jobs.read_job(folder)
    with pytest.raises(UserInputError, match="Export Training Job"):
        jobs.read_job(tmp_path)
    result = headless(tmp_path / "nowhere")
    assert result.returncode == 2 and "error: " in result.stderr and "Traceback" not in result.stderr


# ---- one process ---------------------------------------------------------------------------------
def test_headless_writes_the_lora_optim_and_chart_the_nodes_write(tmp_path, uninterrupted):
    job = make_job(tmp_path / "job")
    result = headless(job, "--log-every", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    out = job / "output"
    lora = only_file(out, "trained_lora_24_steps_00001_.safetensors")
    assert (out / "trained_lora_24_steps_00001_.optim").is_file()
    assert (out / "loss_graph_00001_.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_same_tensors(load_file(str(lora)), uninterrupted)
    metadata = metadata_of(lora)
    assert metadata["steps"] == metadata["ss_steps"] == "24" and metadata["stopped_early"] == "false"
    assert json.loads(metadata["training_settings"]) == jobs.config_to_dict(CONFIG)
    assert json.loads(metadata["node_settings"]) == {k: SETTINGS[k] for k in
                                                     ("lora_dtype", "quantized_backward", "bucket_mode", "existing_lora")}
    assert "step 8/24  loss" in result.stdout and "step 24/24" in result.stdout
    # Checkpoints as Train LoRA's save_every_steps names them; run_state says the job is done.
    assert {p.name for p in (out / "checkpoints").glob("*.safetensors")} == {
        f"lora_{s}_steps_{i:05d}_.safetensors" for i, s in enumerate((4, 8, 12, 16, 20), start=1)}
    assert json.loads((job / jobs.RUN_STATE).read_text())["finished"] is True
    again = headless(job)
    assert again.returncode == 0 and "finished already" in again.stdout


def test_ctrl_c_writes_a_checkpoint_and_the_same_command_continues_exactly(tmp_path, uninterrupted):
    job = make_job(tmp_path / "job", save_every_steps=0)
    proc = subprocess.Popen([sys.executable, "headless.py", str(job), "--no-progress", "--log-every", "1"], cwd=ROOT,
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    state = json.loads((job / jobs.RUN_STATE).read_text())
    checkpoint = Path(state["checkpoint"])
    assert 3 <= state["step"] < 24 and checkpoint.is_file() and checkpoint.with_suffix(".optim").is_file()
    assert metadata_of(checkpoint)["stopped_early"] == "true"
    result = headless(job)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"continuing {checkpoint}" in result.stdout
    assert_same_tensors(load_file(str(only_file(job / "output", "trained_lora_24_steps_*.safetensors"))), uninterrupted)


# ---- torchrun -----------------------------------------------------------------------------------
def worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun's agent (process `agent`) runs now."""
    pids = {}
    children = Path(f"/proc/{agent}/task/{agent}/children")
    for pid in (children.read_text().split() if children.exists() else []):
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "RANK" in env:
            pids[int(env["RANK"])] = int(pid)
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_killed_worker_is_restarted_by_torchrun_and_continues_from_the_last_checkpoint(tmp_path):
    job = make_job(tmp_path / "job", steps=40)
    proc = torchrun(job, restarts=1)
    checkpoints = job / "output" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("lora_*_steps_*.optim")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    victim = worker_pids(proc.pid).get(1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output
    assert "continuing" in output, f"the kill landed after the run ended; nothing was resumed:\n{output}"
    final = only_file(job / "output", "trained_lora_40_steps_*.safetensors")
    # 2 ranks x 2 samples == 1 process x 2 samples x 2 accumulation steps, bit for bit, killed or not.
    assert_same_tensors(load_file(str(final)), reference(steps=40, batch_size=2, grad_accumulation_steps=2))


def test_a_rank_that_cannot_load_its_model_ends_every_rank_with_one_message(tmp_path):
    job = make_job(tmp_path / "job")
    proc = torchrun(job, env={"LORA_TRAINER_TEST_FAIL_RANK": "1"})
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    message = "could not load the job's model and dataset: test: this rank was told to fail loading its model"
    assert output.count(message) == 1 and "rank 1 (" in output, output
    assert not (job / "output").exists()


def test_a_job_continuing_a_lora_adds_its_steps_as_existing_lora_does(tmp_path, uninterrupted):
    """Export with existing_lora copies the file (and its .optim) as start_lora: 8 steps done + 16 = 24."""
    from lora_core.lorafile.resume import save_checkpoint

    first = train(make_toy_denoiser("eps", seed=2, config=NET), toy_dataset(IMAGES, seed=2),
                  dataclasses.replace(CONFIG, steps=8))
    job = make_job(tmp_path / "job", steps=16)
    save_checkpoint(job / "start_lora.safetensors", first.adapter_set, dataclasses.replace(CONFIG, steps=8), 8,
                    "diffusion_model.", first.optimizer_state)
    document = json.loads((job / jobs.JOB_FILE).read_text())
    document["start_lora"] = "start_lora.safetensors"
    (job / jobs.JOB_FILE).write_text(json.dumps(document))
    result = headless(job)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "steps 8 -> 24" in result.stdout
    assert_same_tensors(load_file(str(only_file(job / "output", "trained_lora_24_steps_*.safetensors"))), uninterrupted)
