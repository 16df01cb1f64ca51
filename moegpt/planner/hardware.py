"""Measured hardware figures for this machine (the planner's ``local`` entry builds on these).

Peak FLOP/s are measured with a square matmul; MFU divides achieved FLOP/s by this figure.
"""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 2048,
                         repeats: int = 10, budget_s: float = 3.0) -> float:
    """Best-of-``repeats`` FLOP/s of an (n x n) @ (n x n) matmul on ``device``, stopping early once
    ``budget_s`` is spent (bf16 on a CPU without bf16 units is ~100x slower than fp32)."""
    g = torch.Generator().manual_seed(0)  # not the global RNG: a training run's stream stays untouched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    best = float("inf")
    start = time.perf_counter()
    for i in range(repeats + 1):  # the first run warms up
        if i > 1 and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_copy_bandwidth(device: str = "cpu", n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-``repeats`` memory copy bandwidth in bytes/s (read + write counted)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best
