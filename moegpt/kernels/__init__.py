"""C++ CPU kernels for decoding, registered with torch.library (``torch.ops.moegpt.*``), each beside
its pure-PyTorch reference: the fallback where no kernel can be built, and the tests' oracle.

The kernels are compiled at first use with ``torch.utils.cpp_extension`` (``-O3 -march=native
-fopenmp``) and the build is cached under ``$MOEGPT_CACHE/kernels`` (default ``~/.cache/moegpt``),
keyed by the sources, this CPU's instruction-set flags, torch's version and the compiler, so a cache
built on another CPU is never loaded. Without a compiler, or when the build fails, one line says so
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

SOURCES = (Path(__file__).with_name("gemv.cpp"),)
MAX_GEMV_ROWS = 8  # past this, the library's matmul (which blocks over rows) is the better kernel


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, I), w (O, I) as nn.Linear stores it -> (M, O): what ``torch.ops.moegpt.gemv`` computes."""
    return (x.float() @ w.float().t()).to(x.dtype)


def expert_gemv_reference(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """x (A, I), w (E, O, I), expert (A,) -> (A, O): row a times expert[a]'s matrix (``expert_gemv``)."""
    return torch.stack([x[a].float() @ w[int(e)].float().t() for a, e in enumerate(expert)]).to(x.dtype)


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
    for src in SOURCES:
        h.update(src.read_bytes())
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


def gemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch.ops.moegpt.gemv`` runs this product: a few rows, on the CPU, fp32 or bf16
    (``w`` (O, I), or an expert stack (E, O, I) for ``expert_gemv``), stored (in, out) or (out, in)."""
    return (x.device.type == "cpu" and x.shape[0] <= MAX_GEMV_ROWS and w.dtype in (torch.float32, torch.bfloat16)
            and (w.stride(-2) == 1 or w.stride(-1) == 1) and available())
