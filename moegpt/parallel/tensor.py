"""Tensor parallelism (Megatron style) with DTensor, applied to a plain MoEGPT from outside.

Legend: B batch, T tokens, D d_model, H query heads, G kv heads, Dh head dim, tp the TP degree.

Per block:
- attention: wq (and wk/wv when G divides by tp) colwise, so each rank holds H/tp heads; wo rowwise,
  its output all-reduced. With MQA (G = 1) the single KV head is replicated: every rank computes it,
  and the gradient of k/v, which each rank sees only from its own heads, is all-reduced in backward.
- experts: each expert's FFN dimension is split (w_up/w_gate rows, w_down columns); see expert.py.
- everything else (embedding, norms, router, head) is replicated; its gradients come out identical
  on every TP rank because the activations around it are whole.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient in backward (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)


def _sum_grad_over(group):
    def hook(module, args, output):
        return copy_to_group(output, group)
    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard every block's attention over ``tp_mesh`` (1-D); experts are sharded by expert.py."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from moegpt.model.attention import Attention

    tp = tp_mesh.size()
    group = tp_mesh.get_group()
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        plan = {"wq": ColwiseParallel(), "wo": RowwiseParallel()}
        if module.n_kv_heads % tp == 0:
            plan.update(wk=ColwiseParallel(), wv=ColwiseParallel())
            module.n_kv_heads //= tp
        else:  # MQA: one KV head on every rank; its gradient is summed over the ranks' heads
            module.wk.register_forward_hook(_sum_grad_over(group))
            module.wv.register_forward_hook(_sum_grad_over(group))
        parallelize_module(module, tp_mesh, plan)
        module.n_heads //= tp  # the local heads: (B, T, H/tp, Dh) views in forward
