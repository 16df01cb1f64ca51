"""Next-token logits of whole blocks computed the way generation computes them: teacher-forced
through the decode program (decode.py), one position at a time against a paged KV cache, rather
than through the model's forward. For a quantized model this includes what only decoding does (its
int8 activations, quant/scheme.py), so ``moegpt quantize`` gates on what a user's ``generate``
gets.

Legend: B blocks (sequences), T tokens per block, V vocab.
"""

from __future__ import annotations

from typing import Iterator

import torch

from moegpt.infer.decode import decode_step, decode_weights
from moegpt.infer.decode_batch import DecodeMeta
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.model import MoEGPT

BLOCK_SIZE = 16


@torch.no_grad()
def decoded_logits(model: MoEGPT, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
    """inputs (B, T) -> the logits (B, V) of each position t = 0 .. T-1 in turn, each computed by one
    decode step of all B sequences given their tokens up to t."""
    B, T = inputs.shape
    per_seq = -(-T // BLOCK_SIZE)
    weights = decode_weights(model)
    dtype = model.norm.weight.dtype
    cache = PagedKVCache(model.cfg, B * per_seq + 1, BLOCK_SIZE, dtype, inputs.device)  # block 0: never used
    tables = (torch.arange(B * per_seq, device=inputs.device) + 1).view(B, per_seq)
    for t in range(T):
        meta = DecodeMeta(block_tables=tables, block_size=BLOCK_SIZE, lens=(t + 1,) * B)
        positions = torch.full((B,), t, dtype=torch.long, device=inputs.device)
        logits, _ = decode_step(weights, inputs[:, t].contiguous(), positions, cache.k, cache.v, meta)
        yield logits
