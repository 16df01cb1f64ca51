"""Mixture-of-Experts feed-forward: a linear router, top-k of E experts per token, experts stored as
stacked weight tensors and run one matmul per expert over the tokens grouped to it.

Legend: N tokens (B*T), D d_model, F d_ff, E experts, K top-k, A = N*K assignments.

Routing follows Mixtral: softmax over all E experts, keep the top-k, renormalise their weights to
sum to 1. The seam for expert parallelism is ``Experts.forward``: it takes tokens already grouped by
expert plus per-expert counts, so a dispatch/combine (all-to-all) can wrap it from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.experts import Experts


@dataclass
class RouterStats:
    """What one MoE layer reports besides its output.

    The losses are properties, computed from the kept router tensors only when asked: training asks
    (and backpropagates through them), inference reads only ``expert_counts`` and pays for nothing else.
    """

    logits: torch.Tensor  # (N, E) router logits
    probs: torch.Tensor  # (N, E) fp32 softmax of the logits
    top_k: int
    expert_counts: torch.Tensor  # (E,) assignments per expert, before any capacity drop
    kept_counts: torch.Tensor  # (E,) assignments each expert ran (= expert_counts when dropless)

    @property
    def aux_loss(self) -> torch.Tensor:
        """() Switch load-balancing loss; 1.0 when perfectly balanced."""
        return load_balancing_loss(self.probs, self.expert_counts, self.top_k)

    @property
    def z_loss(self) -> torch.Tensor:
        """() router z-loss (ST-MoE): mean logsumexp(logits)^2."""
        return torch.logsumexp(self.logits.float(), dim=-1).pow(2).mean()

    @property
    def dropped(self) -> torch.Tensor:
        """() assignments dropped by the capacity limit (0 when dropless)."""
        return self.expert_counts.sum() - self.kept_counts.sum()


@dataclass
class Routing:
    """Assignments sorted by expert. ``token`` indexes the N input tokens."""

    token: torch.Tensor  # (A',) source token of each kept assignment, grouped by expert
    weight: torch.Tensor  # (A',) its renormalised routing weight
    counts: torch.Tensor  # (E,) kept assignments per expert (sums to A')
    order: torch.Tensor  # (A',) index of each kept assignment in the token-major (N, K) layout


def load_balancing_loss(probs: torch.Tensor, expert_counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's loss E * sum_e f_e * P_e, with f_e the fraction of the N*K assignments
    that go to expert e and P_e the mean router probability of e. Uniform routing gives 1."""
    N, E = probs.shape
    f = expert_counts.to(probs.dtype) / (N * top_k)  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return E * torch.sum(f * P)


def route(logits: torch.Tensor, top_k: int, capacity: int | None) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    """logits (N, E) -> (Routing, probs (N, E), counts before drop (E,))."""
    N, E = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
    top_w, top_e = torch.topk(probs, top_k, dim=-1)  # (N, K)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    flat_e = top_e.reshape(-1)  # (A,)
    order = torch.argsort(flat_e, stable=True)  # stable: within an expert, tokens keep their order
    counts = torch.bincount(flat_e, minlength=E)  # (E,)
    token = order // top_k  # (A,)
    weight = top_w.reshape(-1).index_select(0, order)  # (A,)
    kept_counts = counts
    if capacity is not None:
        # Rank of each assignment within its expert; those past the capacity are dropped.
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        rank = torch.arange(order.numel(), device=logits.device) - starts.repeat_interleave(counts)
        keep = rank < capacity
        token, weight, order = token[keep], weight[keep], order[keep]
        kept_counts = counts.clamp(max=capacity)
    return Routing(token=token, weight=weight, counts=kept_counts, order=order), probs, counts


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.n_experts = cfg.n_experts
        self.capacity_factor = cfg.capacity_factor
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.mlp)

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x.shape
        N, K = B * T, self.top_k
        flat = x.reshape(N, D)  # (N, D)
        logits = self.router(flat)  # (N, E)
        routing, probs, counts = route(logits, K, self.capacity(N))
        # Indexing, not index_select: its backward (a sorted index_put) stays deterministic on CUDA
        # where each token's k rows are summed; index_select's index_add backward uses atomics.
        y = self.experts(flat[routing.token], routing.counts)  # (A', D) grouped by expert
        y = y * routing.weight[:, None]  # fp32 weights: (A', D) in fp32
        if y.dtype != flat.dtype:
            y = y.to(flat.dtype)
        if routing.order.shape[0] == N * K:
            # Dropless: un-sort the rows back to token-major (N, K, D) (a copy, no accumulation) and
            # sum each token's k rows. Cheaper than index_add's scatter; for k=2 the sum is exactly
            # index_add's (one addition, commutative), the reference in tests.
            out = y.new_empty(N * K, D).index_copy_(0, routing.order, y).view(N, K, D).sum(dim=1)  # (N, D)
        else:
            out = torch.zeros_like(flat).index_add_(0, routing.token, y)  # combine: sum over the kept experts
        stats = RouterStats(logits=logits, probs=probs, top_k=K, expert_counts=counts, kept_counts=routing.counts)
        return out.view(B, T, D), stats
