"""Parallelism applied to a plain MoEGPT from outside: ``parallelize(model, dims, mesh)``.

The order of the steps matters, and is the same at any scale:

1. Tensor parallel (tensor.py): attention heads split over "tp" with DTensor ``parallelize_module``.
   First, because it changes the modules' own parameters into DTensors the later steps wrap.
2. Expert sharding (expert.py): each MoE layer's experts over "ep" (all-to-all dispatch/combine) and
   their FFN dimension over "tp"; parameter names stay the model's.
3. Pipeline split (pipeline.py): this rank keeps only its stages' layers (and the embedding / head
   on the first / last stage); the rest of the model is dropped.
4. Data parallel (fsdp.py): FSDP2 / HSDP over ("dp_replicate", "dp_shard"), DDP for ZeRO-1 when dp
   is the only degree, or replicas whose gradients the step all-reduces (ZeRO-1 in other layouts:
   the optimizer partitions its state, see optim.py). Last: it wraps what the steps above built.

``moegpt/model`` never imports torch.distributed; everything distributed lives in this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moegpt.model import MoEGPT
from moegpt.parallel.dims import DataParallel, ParallelDims, Schedule, stage_layers

__all__ = ["DataParallel", "ParallelDims", "ParallelModel", "Schedule", "parallelize", "stage_layers"]


@dataclass
class ParallelModel:
    """What a rank runs after ``parallelize``: a module (no PP) or its pipeline stages."""

    dims: ParallelDims
    mesh: object  # DeviceMesh with dims MESH_DIMS
    module: nn.Module | None  # the (possibly DDP/FSDP-wrapped) model, None with pipeline parallelism
    stages: list = field(default_factory=list)  # StageModule per local stage (PP only)
    batch_rank: int = 0  # which of the dp x ep data shards this rank reads
    pp_rank: int = 0
    batch_group: object = None  # ranks holding copies of the dense weights (dp x ep)
    dp_group: object = None  # ranks holding copies of one expert shard (dp)
    pp_group: object = None

    @property
    def reduces_in_backward(self) -> bool:
        """DDP averages gradients in backward; FSDP sums them (fsdp.py); otherwise the step sums them."""
        from torch.nn.parallel import DistributedDataParallel

        return isinstance(self.module, DistributedDataParallel)

    @property
    def local_modules(self) -> list[nn.Module]:
        return self.stages if self.stages else [self.module]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Unique local parameters with the model's names (a DDP ``module.`` prefix removed)."""
        seen, out = set(), []
        for m in self.local_modules:
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name.removeprefix("module."), p))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def replicas(self, p: torch.Tensor) -> int:
        """How many ranks hold this same shard of ``p`` (to count it once in a global norm)."""
        from torch.distributed.tensor import DTensor

        shards = self.dims.pp
        if isinstance(p, DTensor):
            for size, placement in zip(p.device_mesh.shape, p.placements):
                if placement.is_shard():
                    shards *= size
        return self.dims.world_size // shards


def _fsdp_meshes(mesh, dims: ParallelDims):
    """(mesh of the dense weights' copies, mesh of one expert's copies or None) for fully_shard."""
    dp = ("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ("dp_shard",)
    if dims.ep == 1:
        return (mesh[dp] if len(dp) > 1 else mesh[dp[0]]), None
    if dims.dp_replicate > 1:  # HSDP: replicate across groups, shard over dp_shard x ep within one
        return mesh["dp_replicate", "dp_shard_ep"], mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard_ep"], mesh["dp_shard"]


def parallelize(model: MoEGPT, dims: ParallelDims, mesh) -> ParallelModel:
    """Apply ``dims`` to ``model`` (the same initial weights on every rank) in the documented order."""
    from moegpt.parallel.expert import apply_expert_sharding
    from moegpt.parallel.fsdp import apply_ddp, apply_fsdp
    from moegpt.parallel.pipeline import split_stages
    from moegpt.parallel.tensor import apply_tensor_parallel

    coord = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    batch_rank = (coord["dp_replicate"] * dims.dp_shard + coord["dp_shard"]) * dims.ep + coord["ep"]
    mesh["dp_shard", "ep"]._flatten("dp_shard_ep")  # FSDP's mesh for the dense weights under EP
    pm = ParallelModel(dims=dims, mesh=mesh, module=None, batch_rank=batch_rank, pp_rank=coord["pp"],
                       batch_group=mesh["dp_replicate", "dp_shard", "ep"]._flatten("batch").get_group(),
                       dp_group=mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group(),
                       pp_group=mesh["pp"].get_group())
    if dims.tp > 1:  # 1
        apply_tensor_parallel(model, mesh["tp"])
    if dims.ep > 1 or dims.tp > 1:  # 2
        apply_expert_sharding(model, mesh, dims.ep, dims.tp)
    modules = [model]
    if dims.pp > 1:  # 3
        pm.stages = modules = split_stages(model, dims, pm.pp_rank)
    if dims.data_parallel == DataParallel.FSDP:  # 4
        for m in modules:
            apply_fsdp(m, *_fsdp_meshes(mesh, dims))
        pm.module = None if dims.pp > 1 else model
    elif dims.pp > 1:
        pass  # replicas (or ZeRO-1): the step all-reduces the stages' gradients
    elif dims.data_parallel == DataParallel.ZERO1 and dims.world_size == dims.dp:
        pm.module = apply_ddp(model, pm.dp_group)
    else:
        pm.module = model
    return pm
