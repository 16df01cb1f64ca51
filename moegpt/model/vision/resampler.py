"""Flamingo's Perceiver resampler: a fixed number of learned latents attend to an image's patch
features (and to themselves), so every image becomes ``n_latents`` vectors whatever its patch count.

latents -> R x [latents += attn(q=LN(latents), kv=[LN(features); LN(latents)]); latents += FF(LN(latents))]
-> LN. (Flamingo, Alayrac et al. 2022, section 2.1 and its appendix A.1.1.)

Legend: N images, S patch features per image, L latents, Dv feature width, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.vision_config import VisionConfig


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Flamingo's FFW: LN -> Linear -> GELU -> Linear, bias-free."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_features = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features (N, S, Dv), latents (N, L, Dv) -> (N, L, Dv)."""
        N, L, _ = latents.shape
        H, Dh = self.heads, self.head_dim
        latents = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_features(features), latents], dim=1)  # (N, S + L, Dv)
        q = self.wq(latents).view(N, L, H, Dh).transpose(1, 2)  # (N, H, L, Dh)
        k, v = self.wkv(kv_in).view(N, -1, 2, H, Dh).permute(2, 0, 3, 1, 4)  # 2 x (N, H, S + L, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, Dh)
        return self.wo(out.transpose(1, 2).reshape(N, L, H * Dh))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.tower.hidden_size
        self.latents = nn.Parameter(torch.zeros(cfg.n_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, cfg.resampler_heads, cfg.resampler_head_dim),
                           feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.resampler_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, S, Dv) -> latents (N, L, Dv)."""
        x = self.latents.expand(features.shape[0], -1, -1)  # (N, L, Dv)
        for attn, ff in self.layers:
            x = x + attn(features, x)
            x = x + ff(x)
        return self.norm(x)
