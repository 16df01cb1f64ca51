"""The optimizer of a parallelised model: the same AdamW as one process (trainer.make_optimizer), with
its parameter groups split by kind so the fused kernel never mixes DTensors and plain tensors, or
partitioned over the data-parallel ranks (ZeRO-1)."""

from __future__ import annotations

import torch

from moegpt.parallel import ParallelModel
from moegpt.parallel.dims import DataParallel
from moegpt.train.config import TrainConfig


def make_parallel_optimizer(pm: ParallelModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    from torch.distributed.tensor import DTensor

    groups: dict[tuple[bool, bool], list] = {}
    for _, p in pm.named_parameters():
        groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (decay, _), ps in sorted(groups.items(), reverse=True)]
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    if pm.dims.data_parallel == DataParallel.ZERO1:
        from moegpt.parallel.fsdp import zero1_optimizer

        return zero1_optimizer(param_groups, pm.dp_group, **adamw)
    return torch.optim.AdamW(param_groups, **adamw)
