"""Causal self-attention with any number of KV heads: 1 is multi-query (the article's choice), fewer
than the query heads is grouped-query, equal is multi-head.

Legend: B batch, T new tokens, S keys (cached + new), H query heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.layers import apply_rope


class KVCacheView(Protocol):
    """One layer's view of a KV cache. ``update`` stores the new keys/values at ``positions`` and
    returns every key/value the new queries may attend to, plus the keys' positions."""

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCacheView | None = None) -> torch.Tensor:
        """x (B, T, D); cos/sin (T, Dh); positions (T,) absolute positions of the new tokens."""
        B, T, _ = x.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, G, Dh).transpose(1, 2)  # (B, G, T, Dh)
        v = self.wv(x).view(B, T, G, Dh).transpose(1, 2)  # (B, G, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            mask, causal = None, True
        else:
            k, v, key_positions = cache.update(k, v, positions)  # (B, G, S, Dh), (S,)
            # A query sees keys at or before its own position (prefill after context, or a
            # speculative block); a single query at the newest position sees everything.
            if T == 1 and bool(key_positions.max() <= positions[0]):
                mask = None
            else:
                mask = key_positions[None, :] <= positions[:, None]  # (T, S)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=G != H)  # (B, H, T, Dh)
        out = out.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, H*Dh)
        return self.wo(out)
