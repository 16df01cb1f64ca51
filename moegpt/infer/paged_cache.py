"""The paged KV cache's tensors and the per-step attention over them.

Keys/values live in slots: slot = block * block_size + offset, one (G, Dh) row per slot and layer,
so with multi-query attention (G = 1) a token costs n_heads times less cache than with multi-head.
The runner builds ``PagedAttentionMetadata`` for a step (where the new tokens' keys go, and every
key each sequence may attend to); each layer's ``PagedLayerView`` writes and attends with it.

Legend: N new tokens in the step (all sequences, flattened), S_i keys of sequence i, H query heads,
G kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.config import ModelConfig
from moegpt.model.attention import attention_over_keys


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes: K and V, every layer, G heads of Dh values."""
    return 2 * cfg.n_layers * cfg.kv_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) slot of each new token's key/value
    query_lens: tuple[int, ...]  # new tokens of each sequence, in batch order (sums to N)
    context_slots: tuple[torch.Tensor, ...]  # per sequence, (S_i,) slots of all its keys by position


class PagedLayerView:
    def __init__(self, k_slots: torch.Tensor, v_slots: torch.Tensor, meta: PagedAttentionMetadata):
        self.k_slots, self.v_slots, self.meta = k_slots, v_slots, meta  # (slots, G, Dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, Dh), k/v (1, G, N, Dh) of the step's new tokens at ``positions`` (N,) -> (1, H, N, Dh)."""
        meta = self.meta
        self.k_slots[meta.slot_mapping] = k[0].transpose(0, 1).to(self.k_slots.dtype)  # (N, G, Dh)
        self.v_slots[meta.slot_mapping] = v[0].transpose(0, 1).to(self.v_slots.dtype)
        outs, start = [], 0
        for q_len, slots in zip(meta.query_lens, meta.context_slots):
            keys = self.k_slots[slots].transpose(0, 1)[None].to(q.dtype)  # (1, G, S_i, Dh)
            values = self.v_slots[slots].transpose(0, 1)[None].to(q.dtype)
            key_positions = torch.arange(slots.numel(), device=q.device)  # (S_i,)
            outs.append(attention_over_keys(q[:, :, start:start + q_len], keys, values,
                                            positions[start:start + q_len], key_positions))
            start += q_len
        return torch.cat(outs, dim=2)  # (1, H, N, Dh)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)  # (slots, G, Dh)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    def views(self, meta: PagedAttentionMetadata) -> list[PagedLayerView]:
        return [PagedLayerView(k, v, meta) for k, v in zip(self.k, self.v)]
