"""Machine probes: this machine's matmul peak and memory bandwidth, measured.

Used by the trainer (MFU), the planner's ``local`` hardware entry and the benchmarks' rooflines, so
it sits at the bottom of the package with config and counts, and imports nothing of moegpt.

Peak FLOP/s are measured with a square matmul; MFU divides achieved FLOP/s by this figure. Memory
bandwidth is measured two ways: a copy (read + write, as HBM bandwidth is quoted) and a read-only
stream (a sum over a 1 GiB array), the bound of decoding, which reads its weights once a step.
"""

from __future__ import annotations

import time

import torch


def best_time(fn, device: str, repeats: int, budget_s: float) -> float:
    """Fastest of up to ``repeats`` timed calls of ``fn`` (after one warm-up), stopping once
    ``budget_s`` is spent; waits for the device on GPUs."""
    best = float("inf")
    start = time.perf_counter()
    for i in range(repeats + 1):  # the first run warms up
        if i > 1 and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        if i > 0:
            best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 2048,
                         repeats: int = 10, budget_s: float = 3.0) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul on ``device`` (bf16 on a CPU without bf16 units is
    ~100x slower than fp32, hence the time budget)."""
    g = torch.Generator().manual_seed(0)  # not the global RNG: a training run's stream stays untouched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats, budget_s)


def measure_int8_matmul_ops(device: str = "cpu", n: int = 1024, repeats: int = 10, budget_s: float = 3.0) -> float:
    """Best int8 OP/s (multiply-adds count 2) of an (n x n) @ (n x n) int8 matmul into int32
    (torch._int_mm: VNNI on a CPU that has it, int8 tensor cores on a GPU): the peak that 8-bit
    quantized weights compute at."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (n, n), generator=g, dtype=torch.int8).to(device)
    b = torch.randint(-127, 128, (n, n), generator=g, dtype=torch.int8).to(device)
    return 2 * n**3 / best_time(lambda: torch._int_mm(a, b), device, repeats, budget_s)


def measure_copy_bandwidth(device: str = "cpu", n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best memory copy bandwidth in bytes/s (read + write counted)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / best_time(lambda: dst.copy_(src), device, repeats, budget_s=3.0)


def measure_read_bandwidth(device: str = "cpu", n_bytes: int = 2**30, repeats: int = 8,
                           budget_s: float = 3.0) -> float:
    """Best read bandwidth in bytes/s: a sum over an ``n_bytes`` fp32 array (1 GiB: past every cache),
    the plainest stream of reads. Decoding a token reads its weights once, so this is the figure a
    decode roofline divides by. (A large fp32 matrix-vector product was the reference until
    moegpt's own decode kernels read faster than torch's: torch.mv reaches 0.5-0.85 of this sum on
    a 2-core EPYC, moegpt.kernels' gemv 0.8-0.95.)"""
    a = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    return a.numel() * a.element_size() / best_time(lambda: a.sum(), device, repeats, budget_s)
