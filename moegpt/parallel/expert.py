"""Expert parallelism: the E experts of each MoE layer divided over ``ep`` ranks, tokens sent to the
rank that holds their expert and back with ``all_to_all_single`` (uneven splits), and, with tensor
parallelism, each expert's FFN dimension split over ``tp`` ranks.

Legend: A rows grouped by expert (assignments), D d_model, F d_ff, E experts, El = E/ep local experts,
R = ep ranks.

The model's seam is ``Experts.forward(x grouped by expert, counts)``. ``ShardedExperts`` replaces an
``Experts`` module with the same parameter names (so checkpoints keep one set of names in every
layout), holding DTensors sharded over the (ep, tp) mesh, and runs the model's own Experts code on
the local shards: dispatch -> [TP: copy] -> local experts -> [TP: reduce] -> combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moegpt.model.experts import Experts
from moegpt.parallel.tensor import copy_to_group, reduce_from_group


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class Dispatch:
    """How rows travelled, to send the results back."""

    send_splits: list[int]  # (R,) rows this rank sent to each rank
    recv_splits: list[int]  # (R,) rows this rank received from each rank
    order: torch.Tensor  # (A_recv,) received rows regrouped by local expert (source-major -> expert-major)


def dispatch(x: torch.Tensor, counts: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
    """x (A, D) grouped by global expert, counts (E,) -> rows for this rank's experts (A_recv, D) grouped
    by local expert, their counts (El,), and the plan to combine."""
    R = dist.get_world_size(group)
    E = counts.numel()
    El = E // R
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)  # (R*El,) source-major
    recv_counts = recv_counts.view(R, El)  # [source rank, local expert]
    send_splits = counts.view(R, El).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    rows = all_to_all(x, recv_splits, send_splits, group)  # (A_recv, D), source-major
    # Regroup source-major blocks into expert-major order: block (s, e) has recv_counts[s, e] rows
    # starting at row starts[s, e]; list the blocks expert by expert, then each block's rows.
    flat = recv_counts.flatten()  # (R*El,)
    starts = (torch.cumsum(flat, 0) - flat).view(R, El)
    sizes_em, starts_em = recv_counts.t().reshape(-1), starts.t().reshape(-1)  # (El*R,) expert-major
    first_em = torch.cumsum(sizes_em, 0) - sizes_em  # where each block begins in the new order
    within = torch.arange(rows.shape[0], device=x.device) - first_em.repeat_interleave(sizes_em)
    order = starts_em.repeat_interleave(sizes_em) + within  # (A_recv,)
    return rows[order], recv_counts.sum(0), Dispatch(send_splits, recv_splits, order)


def combine(y: torch.Tensor, plan: Dispatch, group) -> torch.Tensor:
    """y (A_recv, D) in expert-major order -> (A, D) back on the ranks and in the order they came from."""
    back = torch.empty_like(y).index_copy(0, plan.order, y)  # source-major again
    return all_to_all(back, plan.send_splits, plan.recv_splits, group)


# Shard dim of each stacked weight for TP: w_up/w_gate (E, F, D) split F; w_down (E, D, F) split F.
_TP_DIM = {"w_up": 1, "w_gate": 1, "w_down": 2}


class ShardedExperts(nn.Module):
    """Stand-in for ``Experts`` with DTensor weights over ``mesh`` (dims "ep" and/or "tp")."""

    def __init__(self, experts: Experts, mesh, ep_group, tp_group):
        super().__init__()
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        self.ep_group, self.tp_group = ep_group, tp_group
        names = mesh.mesh_dim_names
        for name, p in experts.named_parameters():
            placements = [Shard(0) if d == "ep" else Shard(_TP_DIM[name]) if d == "tp" else Replicate() for d in names]
            self.register_parameter(name, nn.Parameter(distribute_tensor(p.detach(), mesh, placements)))
        experts.to("meta")  # only its code is used from now on
        self._template = (experts,)  # a tuple: not registered as a submodule

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        plan = None
        if self.ep_group is not None:
            x, counts, plan = dispatch(x, counts, self.ep_group)  # (A_recv, D), (El,)
        if self.tp_group is not None:
            x = copy_to_group(x, self.tp_group)
        local = {name: p.to_local() for name, p in self.named_parameters()}
        y = torch.func.functional_call(self._template[0], local, (x, counts))  # (A_recv, D)
        if self.tp_group is not None:
            y = reduce_from_group(y, self.tp_group)  # partial sums over F/tp -> whole
        if plan is not None:
            y = combine(y, plan, self.ep_group)  # (A, D)
        return y


def apply_expert_sharding(model: nn.Module, mesh, ep: int, tp: int) -> None:
    """Replace every MoE layer's Experts by ShardedExperts over the ("ep", "tp") dims of ``mesh``
    that are > 1. Dense layers' MLPs are left alone for EP, and split along F for TP."""
    from moegpt.model.experts import DenseMLP
    from moegpt.model.moe import MoE

    for module in list(model.modules()):
        if isinstance(module, MoE):
            dims = tuple(d for d, n in (("ep", ep), ("tp", tp)) if n > 1)
            if dims:
                sub = mesh[dims] if len(dims) > 1 else mesh[dims[0]]
                module.experts = ShardedExperts(module.experts, sub, mesh["ep"].get_group() if ep > 1 else None,
                                                mesh["tp"].get_group() if tp > 1 else None)
        elif isinstance(module, DenseMLP) and tp > 1:
            module.mlp = ShardedExperts(module.mlp, mesh["tp"], None, mesh["tp"].get_group())


def is_expert_param(name: str) -> bool:
    """Parameters of an MoE layer's experts (not a dense layer's MLP)."""
    return ".experts." in name
