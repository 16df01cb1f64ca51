"""A plain contiguous KV cache: one (B, G, T_max, Dh) buffer pair per layer.

Enough for single-stream generation; the paged cache of the inference engine builds on the same
``KVCacheView`` seam. Legend: B batch, G kv heads, T new tokens, S cached length, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moegpt.config import ModelConfig
from moegpt.model.attention import attention_over_keys


class LayerCache:
    """One layer's view: writes new K/V at their positions, returns the filled prefix."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, G, T_max, Dh)
        self.length = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Store k/v (B, G, T, Dh) at ``positions`` (T,), attend q (B, H, T, Dh) to the filled prefix."""
        start, T = int(positions[0]), k.shape[2]
        if start != self.length:
            raise ValueError(f"cache holds {self.length} positions, new tokens start at {start}")
        end = start + T
        if end > self.k.shape[2]:
            raise ValueError(f"sequence length {end} exceeds the cache's max_len {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        if T == 1:  # one query at the newest position sees every cached key: no mask to build
            return F.scaled_dot_product_attention(q, self.k[:, :, :end], self.v[:, :, :end],
                                                  enable_gqa=k.shape[1] != q.shape[1])
        key_positions = torch.arange(end, device=k.device)  # (S,)
        return attention_over_keys(q, self.k[:, :, :end], self.v[:, :, :end], positions, key_positions)


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]
