"""The one place that turns a scheduled batch into tensors: flattened tokens, positions, the paged
attention metadata, then the model, then the logits of the sequences that sample this step.

Legend: N tokens in the step (flattened over sequences), M sequences that sample, V vocab.
"""

from __future__ import annotations

import torch

from moegpt.infer.paged_cache import PagedAttentionMetadata, PagedKVCache
from moegpt.infer.scheduler import Batch
from moegpt.model import MoEGPT


def slots_of(block_table: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of positions [start, end) of a sequence with this block table -> (end - start,)."""
    pos = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


class ModelRunner:
    def __init__(self, model: MoEGPT, cache: PagedKVCache):
        self.model, self.cache = model, cache

    @torch.no_grad()
    def run(self, batch: Batch) -> tuple[list[int], torch.Tensor]:
        """Run the step; returns (seq_ids that sample, their next-token logits (M, V))."""
        bs = self.cache.block_size
        tokens, positions, slot_mapping, context, sampling_rows, sampling_ids = [], [], [], [], [], []
        row = 0
        for entry in batch.entries:
            seq, start, n = entry.seq, entry.start, entry.num_tokens
            tokens.extend(seq.token_ids[start:start + n])
            positions.append(torch.arange(start, start + n))
            slot_mapping.append(slots_of(seq.block_table, bs, start, start + n))
            context.append(slots_of(seq.block_table, bs, 0, start + n))
            row += n
            if entry.samples:
                sampling_rows.append(row - 1)
                sampling_ids.append(seq.seq_id)
        meta = PagedAttentionMetadata(torch.cat(slot_mapping), tuple(e.num_tokens for e in batch.entries), tuple(context))
        out = self.model(torch.tensor([tokens]), torch.cat(positions), self.cache.views(meta))
        return sampling_ids, out.logits[0, sampling_rows]  # (M, V)
