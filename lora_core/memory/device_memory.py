"""How much memory a training run may spend on activations, per device.

Kept apart from the checkpointing mechanics: this is the only place that asks a device (or the
operating system) how much memory is free.
"""

from __future__ import annotations

import torch
from torch import nn


def activation_budget(module: nn.Module, device: torch.device) -> int:
    """Activation bytes checkpointing "auto" lets blocks keep: as much as the model's weights on the
    device take (training then at most about doubles what the model needs), and never more than
    half of the memory still free after a fully checkpointed step.

    Memory is what checkpointing exists for; past that, recomputing only costs time.
    """
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
                  if t.device == device or (t.device.type == device.type and device.index is None))
    free = free_memory(device)
    return weights if free is None else min(weights, free // 2)


def free_memory(device: torch.device) -> int | None:
    """Bytes still available for tensors on `device`: CUDA free memory plus what PyTorch caches beyond
    its peak so far; on a CPU the system's available RAM. None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.max_memory_allocated(device)
        return free + max(cached, 0)
    if device.type == "cpu":
        try:
            import psutil
            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None
