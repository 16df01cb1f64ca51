"""Feed-forward blocks stored as stacked weights: the experts of an MoE layer, and the MLP of a
dense layer as the special case of one expert that every token goes to.

Legend: A rows grouped by expert, N tokens, D d_model, F d_ff, E experts.
SwiGLU: down(silu(gate x) * up x).  GELU: down(gelu(up x)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import MLPKind
from moegpt.model.grouped import grouped_linear


def expert_mlp(x: torch.Tensor, weight: Callable[[str], object], kind: MLPKind,
               linear: Callable[[torch.Tensor, object], torch.Tensor]) -> torch.Tensor:
    """The expert MLP on rows x (A, D) -> (A, D): ``weight(name)`` gives the matrix named w_gate, w_up
    or w_down, and ``linear(rows, matrix)`` multiplies by it (a stack of experts over grouped rows, or
    one expert's matrix)."""
    if kind == MLPKind.SWIGLU:
        h = F.silu(linear(x, weight("w_gate"))) * linear(x, weight("w_up"))  # (A, F)
    else:
        h = F.gelu(linear(x, weight("w_up")), approximate="tanh")  # (A, F)
    return linear(h, weight("w_down"))  # (A, D)


class Experts(nn.Module):
    """E expert MLPs as stacked weights (E, out, in)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, kind: MLPKind):
        super().__init__()
        self.kind = kind
        self.w_up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model)) if kind == MLPKind.SWIGLU else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (A, D) grouped by expert, counts (E,) -> (A, D): every expert's MLP on its own rows."""
        sizes = counts.tolist()
        return expert_mlp(x, lambda name: getattr(self, name), self.kind, lambda h, w: grouped_linear(h, w, sizes))


class DenseMLP(nn.Module):
    """The feed-forward block of a dense (non-MoE) layer: one expert that sees every token."""

    def __init__(self, d_model: int, d_ff: int, kind: MLPKind):
        super().__init__()
        self.mlp = Experts(1, d_model, d_ff, kind)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, T, D = x.shape
        counts = torch.tensor([B * T])
        return self.mlp(x.reshape(B * T, D), counts).view(B, T, D), None
