"""Start N gloo worker processes with torch.distributed.run, as the distributed tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def torchrun(nproc: int, args: list[str], timeout: float = 240, max_restarts: int = 0,
             module: bool = False) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N [-m] ARGS``; raises with the
    output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": str(HERE.parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", *(["-m"] if module else []), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
