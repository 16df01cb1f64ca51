"""Small building blocks: RMSNorm (rotary position embeddings: rope.py).

Legend: B batch, T tokens, H heads, Dh head dim, D d_model, F d_ff.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) -> (..., D): normalise in fp32 (as HF Llama/Mixtral do), scale in the input's dtype.
    (The dtype checks skip no-op casts: a decode step runs 25 norms, each dispatched op costs µs.)"""
    h = x if x.dtype == torch.float32 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if h.dtype == x.dtype else h.to(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
