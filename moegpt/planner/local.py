"""The ``local`` hardware entry: this machine, measured on the spot and cached with the date.

The cache is one JSON file in a directory the caller passes in (the CLI uses ``$MOEGPT_CACHE`` or
``~/.cache/moegpt``); nothing here reads the environment or keeps state between calls. The measuring
functions are arguments too, so tests pass fakes instead of timing the machine.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moegpt.atomic import write_text_atomic
from moegpt.planner.hardware import Hardware, PeakFlops

CACHE_FILE = "planner-local-hardware-v3.json"  # v2: read bandwidth from a 1 GiB sum; v3: an int8 peak


@dataclass(frozen=True)
class Measurement:
    """What one measurement of this machine found (units: bytes, bytes/s, FLOP/s)."""

    date: str  # ISO date of the measurement
    device: str  # "cpu" or "cuda"
    device_name: str
    mem_bytes: float
    copy_bytes_per_s: float  # read + write, as HBM bandwidth is quoted (kept for reference)
    read_bytes_per_s: float  # a read-only stream (1 GiB sum): the bound of decoding; the HBM figure used
    matmul_flops_fp32: float
    matmul_flops_bf16: float
    matmul_ops_int8: float  # the peak for 8-bit (and 4-bit) quantized weights


@dataclass(frozen=True, kw_only=True)
class Measurers:
    """The measuring functions (moegpt.hardware's by default; fakes in tests)."""

    copy_bandwidth: Callable[[str], float]  # device -> bytes/s
    matmul_flops: Callable[[str, str], float]  # (dtype name: fp32, bf16, int8, device) -> FLOP/s (int8: OP/s)
    read_bandwidth: Callable[[str], float]  # device -> bytes/s (a read-only stream)


def default_measurers() -> Measurers:
    import torch

    from moegpt.hardware import (measure_copy_bandwidth, measure_int8_matmul_ops, measure_matmul_flops,
                                 measure_read_bandwidth)

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # Matmul sizes: a GPU needs a large one to reach its peak; a CPU without bf16 units runs bf16
    # ~100x slower than fp32, so a small one keeps the measurement to seconds.
    sizes = {("cuda", "fp32"): 8192, ("cuda", "bf16"): 8192, ("cpu", "fp32"): 1024, ("cpu", "bf16"): 512}
    def matmul_flops(dtype: str, device: str) -> float:
        if dtype == "int8":
            return measure_int8_matmul_ops(device=device, n=8192 if device == "cuda" else 1024)
        return measure_matmul_flops(dtypes[dtype], device=device, n=sizes[device, dtype])

    return Measurers(
        copy_bandwidth=lambda device: measure_copy_bandwidth(device=device),
        matmul_flops=matmul_flops,
        read_bandwidth=lambda device: measure_read_bandwidth(device=device),  # 1 GiB: past any cache
    )


def _this_device() -> tuple[str, str, float]:
    """(device, name, memory bytes): the first CUDA GPU if there is one, else the CPU and its RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return "cuda", props.name, float(props.total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "cpu", f"cpu ({os.cpu_count()} logical cores)", float(ram)


def measure(measurers: Measurers, today: datetime.date) -> Measurement:
    device, name, mem = _this_device()
    return Measurement(
        date=today.isoformat(), device=device, device_name=name, mem_bytes=mem,
        copy_bytes_per_s=measurers.copy_bandwidth(device),
        read_bytes_per_s=measurers.read_bandwidth(device),
        matmul_flops_fp32=measurers.matmul_flops("fp32", device),
        matmul_flops_bf16=measurers.matmul_flops("bf16", device),
        matmul_ops_int8=measurers.matmul_flops("int8", device),
    )


def read_cache(cache_dir: Path) -> Measurement | None:
    """The cached measurement, or None when there is none (or it is unreadable, or from an older
    version without every field: measure again)."""
    path = Path(cache_dir) / CACHE_FILE
    try:
        return Measurement(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_cache(cache_dir: Path, m: Measurement) -> Path:
    path = Path(cache_dir) / CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(m.__dict__, indent=2, sort_keys=True) + "\n")
    return path


def hardware_from(m: Measurement) -> Hardware:
    """A planner hardware entry from a measurement: one device, no NVLink, no scale-out network.
    Its HBM bandwidth is the read-stream figure: decoding streams weights, it does not copy."""
    return Hardware(
        name="local", mem_bytes=m.mem_bytes, hbm_bytes_per_s=m.read_bytes_per_s,
        peak_flops=PeakFlops(bf16=m.matmul_flops_bf16, int8=m.matmul_ops_int8), nvlink_bytes_per_s=None, nic_bits_per_s_per_gpu=None,
        gpus_per_nvlink_domain=1, measured_on=f"{m.date} ({m.device_name})", peak_flops_fp32=m.matmul_flops_fp32,
    )


def local_hardware(cache_dir: Path, measurers: Measurers | None = None, remeasure: bool = False,
                   today: datetime.date | None = None) -> Hardware:
    """This machine: from the cache in ``cache_dir``, else measured now (a few seconds) and cached.
    A cache written on another device (a home directory shared by a CPU and a GPU machine) is measured
    again."""
    cached = None if remeasure else read_cache(cache_dir)
    if cached is not None and (cached.device, cached.device_name) != _this_device()[:2]:
        cached = None
    if cached is None:
        cached = measure(measurers or default_measurers(), today or datetime.date.today())
        write_cache(cache_dir, cached)
    return hardware_from(cached)
