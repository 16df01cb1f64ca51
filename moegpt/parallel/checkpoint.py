"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), and full weights on rank 0.

Layout under a run directory::

    checkpoints/step_000200/          a DCP checkpoint: every rank writes its own shards (.distcp)
    checkpoints/step_000200/train.json  step, tokens seen, sampler position, layout (rank 0)
    checkpoints/latest                name of the newest complete checkpoint

Parameters keep the plain model's names and global shapes in every layout (DTensors for TP/EP/FSDP
shards, stages keep their layer numbers), so DCP can load a checkpoint saved in one layout into
another: it reads the slices each rank needs. Saving goes to a hidden temporary folder that rank 0
renames into place after every rank has finished, then ``latest`` is replaced atomically: a
half-written checkpoint is never the one resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moegpt.atomic import write_text_atomic
from moegpt.parallel import ParallelModel

LATEST = "latest"
TRAIN_STATE = "train.json"


def _model_state(pm: ParallelModel) -> dict:
    """name -> local parameter (a DTensor where sharded): what DCP saves and loads in place."""
    return {name: p for name, p in pm.named_parameters()}


def _optim_state(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name (``name.exp_avg``...), in place, so DCP reshards it too."""
    from torch.distributed.tensor import DTensor

    from moegpt.parallel.fsdp import local_tensor

    named = dict(pm.named_parameters())
    names = {id(p): n for n, p in named.items()} | {id(local_tensor(p)): n for n, p in named.items()}
    # ZeRO-1: each rank's AdamW holds the state of its own partition only; the keys name the
    # parameters, so DCP loads them into whatever partition (or layout) owns them next time.
    optimizer = getattr(optimizer, "optim", optimizer)
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:  # before the first step: create the state so loading has somewhere to go
                state = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            name = names[id(p)]
            param = named[name]
            for k, v in state.items():
                if isinstance(param, DTensor) and not isinstance(v, DTensor) and k != "step":
                    # ZeRO-1 keeps a local shard's state: name it by its place in the whole tensor
                    v = DTensor.from_local(v, param.device_mesh, param.placements, run_check=False,
                                           shape=param.shape, stride=param.stride())
                out[f"optim.{name}.{k}"] = v  # "step" is the same on every rank: a plain tensor
    return out


def save(root: Path, step: int, pm: ParallelModel, optimizer: torch.optim.Optimizer, train_state: dict,
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` from every rank; returns its folder."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    name = f"step_{step:06d}"
    tmp = root / f".{name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = {"model": _model_state(pm), "optim": _optim_state(pm, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk
    final = root / name
    if dist.get_rank() == 0:
        write_text_atomic(tmp / TRAIN_STATE, json.dumps(train_state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, name + "\n")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in Path(root).glob("step_*") if p.name[5:].isdigit() and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (a renamed folder with its train.json), or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path != root and (path / TRAIN_STATE).is_file():
            return path
    complete = complete_checkpoints(root) if root.is_dir() else []
    return complete[-1] if complete else None


def read_train_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAIN_STATE).read_text())


def load(path: Path, pm: ParallelModel, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer in place (any saved layout) and return the train state."""
    import torch.distributed.checkpoint as dcp

    state = {"model": _model_state(pm), "optim": _optim_state(pm, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    return read_train_state(path)


def full_state_dict(pm: ParallelModel) -> dict[str, torch.Tensor] | None:
    """Every parameter whole, on rank 0 (None elsewhere): for the final model directory and tests."""
    from torch.distributed.tensor import DTensor

    local = {}
    for name, p in pm.named_parameters():
        local[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
    if pm.dims.pp == 1:
        return local if dist.get_rank() == 0 else None
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    out = {}
    for part in gathered:
        out.update(part)
    return out
