"""Causal self-attention with any number of KV heads: 1 is multi-query (the article's choice), fewer
than the query heads is grouped-query, equal is multi-head.

Legend: B batch, T new tokens, S keys (cached + new), H query heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.rope import apply_rope


class KVCacheView(Protocol):
    """One layer's view of a KV cache: it stores the new keys/values and attends the new queries to
    everything cached, so where keys live (a contiguous buffer, paged blocks) is the cache's
    business. The model passes it in as an argument; it holds no global state."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, Dh), k/v (B, G, T, Dh) of the new tokens at ``positions`` (T,) -> (B, H, T, Dh)."""
        ...


@dataclass(frozen=True)
class DocumentMask:
    """The attention view of packed training rows (several documents per row): each token attends
    to the tokens at or before it in its own document only, so no document sees another. Every
    layer gets the same view (the KVCacheView protocol; nothing is cached)."""

    mask: torch.Tensor  # (B, 1, T, T) bool: query t may attend to key s

    @staticmethod
    def of(docs: torch.Tensor) -> "DocumentMask":
        """docs (B, T): the document of each token (a row's documents contiguous, in order)."""
        T = docs.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
        return DocumentMask(((docs[:, :, None] == docs[:, None, :]) & causal)[:, None])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])


def attention_over_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        key_positions: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, Dh) at ``positions`` (T,) attending to k/v (B, G, S, Dh) at ``key_positions`` (S,):
    each query sees the keys at or before its own position. -> (B, H, T, Dh)."""
    T, H, G = q.shape[2], q.shape[1], k.shape[1]
    if T == 1 and bool(key_positions.max() <= positions[0]):
        mask = None  # one query at the newest position sees everything
    else:
        mask = key_positions[None, :] <= positions[:, None]  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G != H)


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
        q = self.wq(x).view(B, T, H, Dh)
        k = self.wk(x).view(B, T, G, Dh)
        v = self.wv(x).view(B, T, G, Dh).transpose(1, 2)  # (B, G, T, Dh)
        # Rotate q and k in one go (elementwise per head, so the same numbers): half the rope ops.
        qk = apply_rope(torch.cat([q, k], dim=2).transpose(1, 2), cos, sin)  # (B, H+G, T, Dh)
        q, k = qk[:, :H], qk[:, H:]  # (B, H, T, Dh), (B, G, T, Dh)

        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H)  # (B, H, T, Dh)
        else:
            out = cache.attend(q, k, v, positions)  # (B, H, T, Dh)
        out = out.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, H*Dh)
        return self.wo(out)
