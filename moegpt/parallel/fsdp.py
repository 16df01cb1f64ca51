"""Data parallelism: plain replicas, ZeRO-1 (DDP + ZeroRedundancyOptimizer) and FSDP2.

- replicate: every rank holds the whole (TP/EP/PP-local) model; after a step's micro-batches each
  gradient is all-reduced (summed) over the ranks that hold copies of it, in one flat buffer per group.
- ZeRO-1: DDP all-reduces gradients during the last micro-batch's backward; the AdamW state is split
  over the ranks and each rank updates and broadcasts its own part (the article's layout uses ZeRO-1).
- FSDP2: ``fully_shard`` per transformer block, then the root; with a 2-D (dp_replicate, dp_shard)
  mesh that is HSDP: shards within a group, replicas across groups.

The loss of every micro-batch is already weighted so that gradients *sum* to the one-process gradient;
FSDP is told to sum; DDP averages over the data-parallel ranks, so the step multiplies by their number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def apply_fsdp(model: nn.Module, dp_mesh, expert_mesh=None) -> nn.Module:
    """Shard each block, then the rest (embedding, norm, head), over ``dp_mesh`` (1-D FSDP, 2-D HSDP).

    ``model`` is a MoEGPT or a pipeline stage (its ``layers`` a list or a dict). With expert
    parallelism, ``dp_mesh`` spans dp x ep (the ranks holding copies of the dense weights) and each
    MoE layer's experts are sharded first, over ``expert_mesh`` (dp: the ranks holding copies of
    one expert). Gradients are summed, not averaged: the step weights each micro-batch itself."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from moegpt.model.moe import MoE

    layers = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in layers:
        if expert_mesh is not None and isinstance(block.ffn, MoE):
            fully_shard(block.ffn.experts, mesh=expert_mesh)
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def apply_ddp(model: nn.Module, dp_group) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, process_group=dp_group, broadcast_buffers=False)


def zero1_optimizer(param_groups: list[dict], dp_group, **adamw) -> torch.optim.Optimizer:
    """AdamW whose state is partitioned over ``dp_group`` (ZeRO stage 1)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    first, *rest = param_groups
    opt = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.AdamW, process_group=dp_group,
                                  weight_decay=first["weight_decay"], **adamw)
    for group in rest:
        opt.add_param_group(group)
    return opt


def all_reduce_grads(params: list[torch.Tensor], group) -> None:
    """Sum the gradients of ``params`` over ``group`` in one flat buffer (local shards of DTensors)."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (its storage: writes go through), or a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t
