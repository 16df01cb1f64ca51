"""Training checkpoints: everything a run needs to continue exactly where it stopped.

Layout under a run directory::

    checkpoints/step_000200/state.pt   model, optimizer, step, data position, RNG states, configs
    checkpoints/latest                 name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash mid-write leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root``; keep the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        raise ValueError(f"{pointer} names {path.name}, which has no state.pt")
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} has no state.pt") from None
    except Exception as e:  # torch raises several types for truncated or corrupt files
        raise ValueError(f"checkpoint {path / 'state.pt'} is corrupt ({type(e).__name__}: {str(e).splitlines()[0]})") from None
