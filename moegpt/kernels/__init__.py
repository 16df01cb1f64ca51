"""C++ CPU kernels for decoding, registered with torch.library (``torch.ops.moegpt.*``), each beside
its pure-PyTorch reference: the fallback where no kernel can be built, and the tests' oracle.

The kernels are compiled at first use with ``torch.utils.cpp_extension`` (``-O3 -march=native
-fopenmp``) and the build is cached under ``$MOEGPT_CACHE/kernels`` (default ``~/.cache/moegpt``),
keyed by the sources (their contents and where they are), this CPU's instruction-set flags, torch's
version and the compiler, so a cache built on another CPU is never loaded, and two checkouts never
rebuild each other's library while one of them has it loaded. Without a compiler, or when the build fails, one line says so
and decoding runs the references. ``MOEGPT_KERNELS=0`` turns them off.

Legend: M rows (a decode step's tokens), I in features, O out features.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(s) for s in ("gemv.cpp", "decode_layer.cpp", "shm_sum.cpp", "dequantize.cpp"))
HEADERS = tuple(Path(__file__).with_name(h) for h in ("gemv.h", "paged_attention.h", "qcommon.h", "qrows.h", "qgemv.h", "qtiles.h"))
# Rows up to which gemv beats the library's matmul (measured on a 2-core EPYC, 2048 x 768, cold,
# as fractions of a paired 1 GiB sum): fp32 stored (in, out) 33 vs 15 GB/s at 2 rows, equal at 6;
# stored (out, in), fp32: 0.95 / 0.84 / 0.61 / 0.35 at 1 / 4 / 8 / 16 rows vs F.linear's 0.34 /
# 0.23 / 0.29 / 0.23; bf16: 0.80 / 0.61 / 0.56 / 0.38 vs 0.33 / 0.30 / 0.33 / 0.24. Past 16 rows both
# are compute-bound (hot, GFLOP/s): fp32 the kernel still wins at 32 and 64 rows (2048 x 768: 104 /
# 101 vs 102 / 80; the 32000 x 768 head: 109 / 125 vs 51 / 86), bf16 the library (151-167 vs 200-287).
MAX_ROWS_IN_BY_OUT = 6
MAX_ROWS_OUT_BY_IN = {torch.float32: 64, torch.bfloat16: 16}


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, I), w (O, I) as nn.Linear stores it -> (M, O): what ``torch.ops.moegpt.gemv`` computes."""
    return (x.float() @ w.float().t()).to(x.dtype)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key(compiler: str) -> str:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:  # contents and place: ninja rebuilds a build directory whose sources moved
        h.update(src.read_bytes())
        h.update(str(src.resolve()).encode())
    h.update(_cpu_flags().encode())
    h.update(torch.__version__.encode())
    h.update(compiler.encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("MOEGPT_CACHE", Path.home() / ".cache" / "moegpt")) / "kernels"


@functools.cache
def available() -> bool:
    """Whether torch.ops.moegpt's kernels are loaded (building them the first time)."""
    if os.environ.get("MOEGPT_KERNELS", "1") == "0":
        return False
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        print("moegpt: no C++ compiler found: decoding uses the pure-PyTorch kernels", file=sys.stderr)
        return False
    try:
        from torch.utils.cpp_extension import load

        # ninja from the interpreter's own environment (the venv's bin need not be on PATH)
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        key = _build_key(compiler)
        build_dir = _cache_dir() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        load(name=f"moegpt_kernels_{key}", sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=False)
    except Exception as e:  # a missing toolchain piece, a compile error: run the references instead
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"moegpt: building the C++ kernels failed ({type(e).__name__}: {first}): decoding uses the "
              "pure-PyTorch kernels", file=sys.stderr)
        return False
    return True


def _row_limit(x: torch.Tensor, w: torch.Tensor) -> int:
    """The most rows the kernels take for this weight (0: not at all)."""
    if x.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return 0
    if w.stride(-2) == 1:
        return MAX_ROWS_IN_BY_OUT
    return MAX_ROWS_OUT_BY_IN[w.dtype] if w.stride(-1) == 1 else 0


def gemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch.ops.moegpt.gemv`` runs x (M, I) @ w.T for w (O, I): a few rows, on the CPU,
    fp32 or bf16, stored (in, out) or (out, in)."""
    return 0 < x.shape[0] <= _row_limit(x, w) and available()


def qgemv_applies(x: torch.Tensor) -> bool:
    """Whether ``torch.ops.moegpt.qgemv`` runs x (M, I) times a quantized weight: on the CPU."""
    return x.device.type == "cpu" and available()


def decode_layer_applies(x: torch.Tensor) -> bool:
    """Whether ``torch.ops.moegpt.decode_layer`` runs a decode step's layers for x (B, D): on the CPU,
    fp32 or bf16 (the caller checks the weights and cache share x's dtype and the batch is few-token)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and available()
