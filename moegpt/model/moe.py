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
    """What one MoE layer reports besides its output."""

    aux_loss: torch.Tensor  # () Switch load-balancing loss; 1.0 when perfectly balanced
    z_loss: torch.Tensor  # () router z-loss (ST-MoE): mean logsumexp(logits)^2
    expert_counts: torch.Tensor  # (E,) assignments per expert, before any capacity drop
    dropped: torch.Tensor  # () assignments dropped by the capacity limit (0 when dropless)


@dataclass
class Routing:
    """Assignments sorted by expert. ``token`` indexes the N input tokens."""

    token: torch.Tensor  # (A',) source token of each kept assignment, grouped by expert
    weight: torch.Tensor  # (A',) its renormalised routing weight
    counts: torch.Tensor  # (E,) kept assignments per expert (sums to A')


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
    weight = top_w.reshape(-1)[order]  # (A,)
    kept_counts = counts
    if capacity is not None:
        # Rank of each assignment within its expert; those past the capacity are dropped.
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        rank = torch.arange(order.numel(), device=logits.device) - starts.repeat_interleave(counts)
        keep = rank < capacity
        token, weight = token[keep], weight[keep]
        kept_counts = counts.clamp(max=capacity)
    return Routing(token=token, weight=weight, counts=kept_counts), probs, counts


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
        flat = x.reshape(B * T, D)  # (N, D)
        logits = self.router(flat)  # (N, E)
        routing, probs, counts = route(logits, self.top_k, self.capacity(B * T))
        y = self.experts(flat[routing.token], routing.counts)  # (A', D)
        y = (y * routing.weight[:, None]).to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, routing.token, y)  # combine: sum over the k experts
        stats = RouterStats(
            aux_loss=load_balancing_loss(probs, counts, self.top_k),
            z_loss=torch.logsumexp(logits.float(), dim=-1).pow(2).mean(),
            expert_counts=counts,
            dropped=counts.sum() - routing.counts.sum(),
        )
        return out.view(B, T, D), stats
