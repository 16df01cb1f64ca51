"""Joining and leaving the torchrun process group, for training and serving alike."""

from __future__ import annotations

import datetime
import os
import resource

import torch
import torch.distributed as dist


def init_distributed(timeout_s: float = 300.0) -> torch.device:
    """Join the torchrun group: NCCL on GPUs, gloo on CPUs; a timeout so a mismatched collective fails
    in minutes, not the default half hour."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # ranks leave together (a rank that tears down early crashes the others' exit)
        dist.destroy_process_group()


def restart_count() -> int:
    """How many times torchrun has restarted this group after a failure (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
