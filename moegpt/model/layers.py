"""Small building blocks: RMSNorm, rotary position embeddings, and one MLP of either kind.

Legend: B batch, T tokens, H heads, Dh head dim, D d_model, F d_ff.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import MLPKind


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama/Mixtral do), scale in the input's dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions (T,) -> two (T, Dh) fp32 tensors.

    The "rotate half" layout (first half of the head paired with the second), as HF Llama/Mixtral.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated by position; cos/sin (T, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def mlp_forward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor | None,
                kind: MLPKind) -> torch.Tensor:
    """One feed-forward block on x (N, D) with weights stored (out, in) as nn.Linear does.

    SwiGLU: down(silu(gate x) * up x).  GELU: down(gelu(up x)).
    """
    if kind == MLPKind.SWIGLU:
        h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)  # (N, F)
    else:
        h = F.gelu(F.linear(x, w_up), approximate="tanh")  # (N, F)
    return F.linear(h, w_down)  # (N, D)


class MLP(nn.Module):
    """The feed-forward block of a dense (non-MoE) layer."""

    def __init__(self, d_model: int, d_ff: int, kind: MLPKind):
        super().__init__()
        self.kind = kind
        self.w_up = nn.Parameter(torch.empty(d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(d_ff, d_model)) if kind == MLPKind.SWIGLU else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, T, D = x.shape
        y = mlp_forward(x.reshape(B * T, D), self.w_up, self.w_down, self.w_gate, self.kind)
        return y.view(B, T, D), None
