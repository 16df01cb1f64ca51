"""The paged KV cache's tensors and the per-step attention over them.

Keys/values live in slots: slot = block * block_size + offset, one (G, Dh) row per slot and layer,
so with multi-query attention (G = 1) a token costs n_heads times less cache than with multi-head.
The runner builds ``PagedAttentionMetadata`` for a step (where the new tokens' keys go, and every
key each sequence may attend to); each layer's ``PagedLayerView`` writes and attends with it.

Two ways to attend, chosen per sequence by its number of new tokens:
- a sequence with one new token (decode) sees every key it has: all such sequences go through one
  scaled_dot_product_attention over their keys gathered into a padded (Bd, G, S_d, Dh) batch, with a
  mask hiding the padding (``DecodeBatch``);
- a sequence with several new tokens (a prefill chunk, or a token with draft tokens to verify) needs
  a causal mask of its own: one attention call per sequence (``attend_each_sequence``), which is
  also the reference the batched path is tested against.

Legend: N new tokens in the step (all sequences, flattened), B sequences, S_i keys of sequence i,
S_max the longest, Bd one-token sequences, H query heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegpt.config import ModelConfig
from moegpt.infer.kv_quant import QuantizedSlots, kv_storage
from moegpt.model.attention import attention_over_keys


def block_table_tensor(tables: list[tuple[int, ...]], nb: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, nb) int64: each sequence's block table cut or padded (with block 0) to nb entries."""
    return torch.tensor([list(t[:nb]) + [0] * (nb - min(nb, len(t))) for t in tables], dtype=torch.long, device=device)


def slots_by_position(tables: torch.Tensor, block_size: int, S: int) -> torch.Tensor:
    """tables (B, >= ceil(S / block_size)) -> (B, S): the slot of each sequence's key at each position
    (slot = block * block_size + offset); a padded table's padding reads block 0 (masked, or never read)."""
    B, nb = tables.shape[0], -(-S // block_size)
    slots = tables[:, :nb, None] * block_size + torch.arange(block_size, device=tables.device)  # (B, nb, block_size)
    return slots.view(B, nb * block_size)[:, :S]


@dataclass(frozen=True, kw_only=True)
class DecodeBatch:
    """The step's one-token sequences, attended together."""

    query_index: torch.Tensor  # (Bd,) where each one's query is among the step's N new tokens
    slots: torch.Tensor  # (Bd, S_d) slots of each one's keys by position, padded with slot 0
    mask: torch.Tensor | None  # (Bd, 1, 1, S_d) True where a key exists; None when no padding


@dataclass(frozen=True, kw_only=True)
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) slot of each new token's key/value
    query_lens: tuple[int, ...]  # new tokens of each sequence, in batch order (sums to N)
    context_lens: tuple[int, ...]  # S_i: keys of each sequence once this step's are written
    context_slots: torch.Tensor  # (B, S_max) slots of each sequence's keys by position (padded)
    decode: DecodeBatch | None  # the one-token sequences (None: there are none, or use the loop)


def attend_each_sequence(k_slots: torch.Tensor, v_slots: torch.Tensor, meta: PagedAttentionMetadata,
                         q: torch.Tensor, positions: torch.Tensor, sequences) -> list[tuple[int, torch.Tensor]]:
    """Attention of the given sequences' queries, one call each -> [(first token index, (1, H, n_i, Dh))]."""
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    outs = []
    for i in sequences:
        start, end, S = starts[i], starts[i + 1], meta.context_lens[i]
        slots = meta.context_slots[i, :S]  # (S_i,)
        keys = k_slots.index_select(0, slots).transpose(0, 1)[None].to(q.dtype)  # (1, G, S_i, Dh)
        values = v_slots.index_select(0, slots).transpose(0, 1)[None].to(q.dtype)
        key_positions = torch.arange(S, device=q.device)  # (S_i,)
        outs.append((start, attention_over_keys(q[:, :, start:end], keys, values, positions[start:end], key_positions)))
    return outs


def attend_decode_batch(k_slots: torch.Tensor, v_slots: torch.Tensor, d: DecodeBatch, q: torch.Tensor) -> torch.Tensor:
    """q (Bd, H, 1, Dh), one query per sequence at its newest position -> (Bd, H, 1, Dh)."""
    Bd, S_d = d.slots.shape
    flat = d.slots.reshape(-1)  # (Bd * S_d,): index_select gathers rows faster than indexing by a 2-D tensor
    keys = k_slots.index_select(0, flat).view(Bd, S_d, *k_slots.shape[1:]).transpose(1, 2)  # (Bd, G, S_d, Dh)
    values = v_slots.index_select(0, flat).view(Bd, S_d, *v_slots.shape[1:]).transpose(1, 2)
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=d.mask, enable_gqa=keys.shape[1] != q.shape[1])


class PagedLayerView:
    def __init__(self, k_slots: torch.Tensor, v_slots: torch.Tensor, meta: PagedAttentionMetadata):
        self.k_slots, self.v_slots, self.meta = k_slots, v_slots, meta  # (slots, G, Dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, Dh), k/v (1, G, N, Dh) of the step's new tokens at ``positions`` (N,) -> (1, H, N, Dh)."""
        meta, N = self.meta, q.shape[2]
        if k.dtype != self.k_slots.dtype:
            k, v = k.to(self.k_slots.dtype), v.to(self.v_slots.dtype)
        self.k_slots.index_copy_(0, meta.slot_mapping, k[0].transpose(0, 1))  # (N, G, Dh) into their slots
        self.v_slots.index_copy_(0, meta.slot_mapping, v[0].transpose(0, 1))
        d = meta.decode
        if d is not None and d.query_index.shape[0] == N:  # a pure decode step: tokens are the sequences
            out = attend_decode_batch(self.k_slots, self.v_slots, d, q[0].transpose(0, 1)[:, :, None])  # (N, H, 1, Dh)
            return out[:, :, 0].transpose(0, 1)[None]  # (1, H, N, Dh)
        out = torch.empty_like(q)  # (1, H, N, Dh)
        loop = range(len(meta.query_lens))
        if d is not None:
            qd = q[0][:, d.query_index].transpose(0, 1)[:, :, None]  # (Bd, H, 1, Dh)
            out[0][:, d.query_index] = attend_decode_batch(self.k_slots, self.v_slots, d, qd)[:, :, 0].transpose(0, 1)
            loop = [i for i, n in enumerate(meta.query_lens) if n != 1]
        for start, o in attend_each_sequence(self.k_slots, self.v_slots, meta, q, positions, loop):
            out[:, :, start:start + o.shape[2]] = o
        return out


class PagedKVCache:
    """Every layer's keys and values by slot, in the model's dtype, or 8-bit with a scale per slot and
    head (``kv_dtype`` "int8" / "fp8": kv_quant.py)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", kv_dtype: str = "auto"):
        self.num_blocks, self.block_size, self.kv_dtype = num_blocks, block_size, kv_dtype
        shape = (num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)  # (slots, G, Dh)
        if kv_dtype == "auto":
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        else:
            storage = kv_storage(kv_dtype)
            self.k = [QuantizedSlots(*shape, storage, dtype, device) for _ in range(cfg.n_layers)]
            self.v = [QuantizedSlots(*shape, storage, dtype, device) for _ in range(cfg.n_layers)]

    @property
    def dtype_name(self) -> str:
        """What the cache stores: the model's dtype, or int8 / fp8."""
        return str(self.k[0].dtype).removeprefix("torch.") if self.kv_dtype == "auto" else self.kv_dtype

    def views(self, meta: PagedAttentionMetadata) -> list[PagedLayerView]:
        return [PagedLayerView(k, v, meta) for k, v in zip(self.k, self.v)]
