"""Data-parallel training over torch.distributed: one model replica per process, launched by torchrun.

Nothing here launches processes or restarts them: `torchrun` does (rendezvous, one process per GPU,
`--max-restarts` after a crash). A process learns its place from the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the group with NCCL on CUDA, gloo on CPU.

How a step is shared, so N ranks give the adapters of one process (see `loop.train`):
- every rank walks the same batch plan with the step's *global* batch size; each takes a
  contiguous share of each micro-batch (`share`): rank 0 the first samples, rank 1 the next...;
- each rank's loss is its samples' summed loss divided by the step's global sample count, so the
  summed gradient over ranks is the one-process gradient (`reduce_gradients`: one all-reduce of
  all adapter gradients, flattened; adapters are megabytes, so overlapping it with backward as DDP
  does would gain little, and DDP needs the adapters' own forward, which here runs inside hooks);
- the stop flag (Ctrl-C on any rank) and the step loss are reduced too, so every rank takes the
  same decision at the same step and no rank is left waiting in a collective.

With two ranks the all-reduced sum a + b is exactly what one process accumulating the same two
micro-batches computes (a + b = b + a in IEEE arithmetic): 2 ranks x batch b match 1 process x
batch b x 2 accumulation steps bit for bit on CPU. Against 1 process x batch 2b the per-sample
maths is the same but the batched matmuls reduce in another order: equal within float32 rounding.

`agree` turns a failure on one rank (say, its model would not load) into the same error on every
rank, instead of the others waiting forever at their next collective.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingStopped, UserInputError
from .plan import MicroBatch

# torchrun's environment; a process started without it trains alone.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _attempt_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """The rendezvous store, its keys kept apart per torchrun restart.

    After a restart torchrun's workers meet in the same store as the attempt before (same
    MASTER_PORT), and the process group's keys carry no attempt number: gloo would then read the
    dead workers' addresses ("Connection refused") and the restart fail. A prefix with
    TORCHELASTIC_RESTART_COUNT gives every attempt its own keys.
    """
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not hosted_by_agent, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"lora_trainer/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class ReplicaFailed(TrainingStopped):
    """Another rank (or this one) failed; raised on every rank with the same message."""


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


@dataclass
class DataParallel:
    """This process's place in the group, and the collectives the training loop needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where collective tensors live (NCCL needs CUDA tensors)

    @classmethod
    def from_environment(cls, timeout_s: float = 600.0, backend: str | None = None) -> "DataParallel | None":
        """Join the group torchrun started; None when this process was not launched as a rank > 1 world.

        On CUDA each process takes the GPU of its LOCAL_RANK, before any model is loaded.
        """
        if not launched_by_torchrun():
            return None
        rank, world, local = (int(os.environ[n]) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        backend = backend or ("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend, store=_attempt_store(rank, world, timeout_s), rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world, local, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- the batch plan ---------------------------------------------------------------------
    def share(self, batch: MicroBatch) -> MicroBatch:
        """This rank's contiguous part of a global micro-batch (sizes differ by at most one; may be empty)."""
        base, extra = divmod(len(batch.indices), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        return MicroBatch(batch.indices[start:stop], batch.visits[start:stop])

    # ---- collectives ----------------------------------------------------------------------
    def reduce_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks (missing gradients count as zero)."""
        parameters = list(parameters)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.detach().reshape(-1).to(self.device, torch.float32) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for parameter, grad in zip(parameters, grads):
            count = grad.numel()
            parameter.grad = flat[offset:offset + count].view_as(grad).to(grad.device, grad.dtype)
            offset += count

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(value.device)

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_parameters(self, parameters: Iterable[torch.Tensor]) -> None:
        """Every rank starts from rank 0's values (they are equal already; this makes it a fact)."""
        with torch.no_grad():
            for parameter in parameters:
                value = parameter.detach().to(self.device).clone()
                dist.broadcast(value, src=0)
                parameter.copy_(value.to(parameter.device))

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable value), in rank order, on every rank."""
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def from_rank(self, make: Callable[[], object], doing: str, src: int = 0) -> object:
        """`make()` run on rank `src` only, its result (any picklable value) given to every rank.

        The value travels pickled between our own processes (never read from a user's file). A
        failure in `make` becomes the same `ReplicaFailed` on every rank.
        """
        box: list = [None]
        if self.rank == src:
            try:
                box[0] = ("ok", make())
            except Exception as error:  # noqa: BLE001 - handed to every rank, then raised there
                box[0] = ("error", f"rank {src} ({socket.gethostname()}) could not {doing}: {_describe(error)}")
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        status, value = box[0]
        if status == "error":
            raise ReplicaFailed(value)
        return value

    def agree(self, error: BaseException | None, doing: str) -> None:
        """Every rank says whether `doing` worked; if any failed, all raise one message naming it."""
        message = None
        if error is not None:
            message = f"rank {self.rank} ({socket.gethostname()}) could not {doing}: {_describe(error)}"
        failed = [m for m in self.gather(message) if m]
        if failed:
            more = f" (and {len(failed) - 1} more rank(s) failed too)" if len(failed) > 1 else ""
            raise ReplicaFailed(failed[0] + more)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _describe(error: BaseException) -> str:
    """A user error's own message; anything else with its type, so a bug is recognisable."""
    return str(error) if isinstance(error, UserInputError) else f"{type(error).__name__}: {error}"
