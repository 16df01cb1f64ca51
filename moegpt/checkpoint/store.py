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

from moegpt.atomic import write_text_atomic

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
        if final.exists():  # the same step saved again (e.g. a stop signal on a checkpoint step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, name + "\n")
    _fsync_dir(root)
    for old in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that hold a state.pt, oldest first (by step number, not by name)."""
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None when there is none.

    ``latest`` names it; if that pointer is missing or names nothing usable (a crash between the
    rename and the pointer update), the newest folder with a state.pt is taken."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path != root and (path / "state.pt").is_file():
            return path
    complete = _complete_checkpoints(root) if root.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} has no state.pt") from None
    except Exception as e:  # torch raises several types for truncated or corrupt files
        raise ValueError(f"checkpoint {path / 'state.pt'} is corrupt ({type(e).__name__}: {str(e).splitlines()[0]})") from None
