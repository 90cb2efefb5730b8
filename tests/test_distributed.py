"""Data-parallel training (issue 16) on CPU: two gloo processes give one process's adapters.

Two ranks with batch b each, summing their gradients, are compared with one process: bit for bit
against batch b x 2 accumulation steps (the same micro-batches, summed in the same order: a + b is
b + a), and within float32 rounding against one batch of 2b (the batched matmuls reduce in another
order). The ranks are started as plain processes with torchrun's environment (faster than torchrun
itself); tests/test_headless.py runs torchrun.
"""
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dp_cases import CASES, one_bucket
from lora_core.training.distributed import DataParallel, launched_by_torchrun
from lora_core.training.loop import train
from lora_core.training.plan import MicroBatch

ROOT = Path(__file__).resolve().parents[1]
# Measured against one batch of 2b at lr 1e-2: at most 9e-6 (Adam turns rounding-level gradient
# differences into lr-sized steps); a sharding bug (a sample lost or counted twice) moves them ~1e-3.
TOLERANCE = dict(rtol=1e-3, atol=5e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(script: Path, args: list[str], world: int = 2, extra_env: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        out.append((proc.returncode, text))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dp")
    results = finish(start_ranks(ROOT / "tests" / "dp_worker.py", [str(out)]))
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{text}"
    return {name: load_file(str(out / f"{name}.safetensors")) for name in CASES}


def single(case, **changes) -> dict:
    denoiser, data, config = case()
    result = train(denoiser, data, dataclasses.replace(config, **changes))
    return {k: v.contiguous() for k, v in result.adapter_set.to_state_dict().items()}


def test_two_ranks_equal_one_process_accumulating_the_same_micro_batches_bit_for_bit(two_ranks):
    _, _, config = one_bucket()
    reference = single(one_bucket, batch_size=config.batch_size // 2, grad_accumulation_steps=2)
    assert reference.keys() == two_ranks["one_bucket"].keys()
    different = [k for k in reference if not torch.equal(reference[k], two_ranks["one_bucket"][k])]
    assert different == []


@pytest.mark.parametrize("case", ["one_bucket", "mixed_buckets"])
def test_two_ranks_equal_one_process_with_the_whole_batch(two_ranks, case):
    reference = single(CASES[case])
    assert reference.keys() == two_ranks[case].keys()
    # LoRA up factors start at zero: how far they moved shows the comparison means something.
    assert max(reference[k].abs().max().item() for k in reference if "lora_up" in k) > 1e-3
    for key in reference:
        torch.testing.assert_close(two_ranks[case][key], reference[key], **TOLERANCE, msg=key)


def test_share_gives_each_rank_a_contiguous_part_and_all_samples_once():
    batch = MicroBatch(tuple(range(10, 15)), tuple((0, p) for p in range(5)))
    parts = [DataParallel(rank, 3, rank, torch.device("cpu")).share(batch) for rank in range(3)]
    assert [p.indices for p in parts] == [(10, 11), (12, 13), (14,)]
    assert [p.visits for p in parts] == [((0, 0), (0, 1)), ((0, 2), (0, 3)), ((0, 4),)]
    one = MicroBatch((7,), ((2, 9),))
    assert [DataParallel(r, 2, r, torch.device("cpu")).share(one).indices for r in range(2)] == [(7,), ()]


def test_a_plain_process_trains_alone(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun() and DataParallel.from_environment() is None
