"""One rank of the data-parallel engine tests (tests/test_distributed.py starts two of these).

Usage: RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dp_worker.py OUT_DIR
Trains every case of `dp_cases.CASES` as one rank of the group; rank 0 writes each case's adapters
to OUT_DIR/<case>.safetensors.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_cases import CASES  # noqa: E402
from lora_core.training.distributed import DataParallel  # noqa: E402
from lora_core.training.loop import train  # noqa: E402

torch.set_num_threads(1)
replica = DataParallel.from_environment(timeout_s=120)
assert replica is not None, "start with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set"
try:
    for name, case in CASES.items():
        denoiser, data, config = case()
        result = train(denoiser, data, config, replica=replica)
        if replica.is_main:
            tensors = {k: v.contiguous() for k, v in result.adapter_set.to_state_dict().items()}
            save_file(tensors, str(Path(sys.argv[1]) / f"{name}.safetensors"),
                      metadata={"loss": repr(result.loss)})
finally:
    replica.close()
