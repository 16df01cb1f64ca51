"""The one place that turns a step's chunks into tensors: flattened tokens, positions, the paged
attention metadata, then the model, then the logits the engine asked for.

A chunk is a run of consecutive tokens of one sequence (a prefill chunk, a decode token, or a decode
token followed by speculative draft tokens). The engine says how many trailing positions of each
chunk need logits: 1 to sample the next token, k+1 to verify k draft tokens, 0 for a prefill chunk
that does not reach the end of the prompt.

Legend: N tokens in the step (flattened over chunks), L logit rows asked for, V vocab, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.infer.paged_cache import PagedAttentionMetadata, PagedKVCache
from moegpt.model import MoEGPT


@dataclass(frozen=True)
class Chunk:
    tokens: tuple[int, ...]  # run at positions [start, start + len(tokens))
    start: int
    block_table: tuple[int, ...]  # physical block of each logical block (covers the chunk's end)
    num_logits: int  # logits of the chunk's last num_logits positions


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # (L, V) the asked-for rows, chunk by chunk in order
    expert_counts: torch.Tensor | None  # (n_layers, E) tokens routed to each expert this step


def slots_of(block_table: tuple[int, ...] | list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of positions [start, end) of a sequence with this block table -> (end - start,)."""
    pos = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


class ModelRunner:
    def __init__(self, model: MoEGPT, cache: PagedKVCache):
        self.model, self.cache = model, cache

    @torch.no_grad()
    def run(self, chunks: list[Chunk]) -> StepOutput:
        bs = self.cache.block_size
        tokens, positions, slot_mapping, context, rows = [], [], [], [], []
        row = 0
        for c in chunks:
            n = len(c.tokens)
            tokens.extend(c.tokens)
            positions.append(torch.arange(c.start, c.start + n))
            slot_mapping.append(slots_of(c.block_table, bs, c.start, c.start + n))
            context.append(slots_of(c.block_table, bs, 0, c.start + n))
            row += n
            rows.extend(range(row - c.num_logits, row))
        meta = PagedAttentionMetadata(torch.cat(slot_mapping), tuple(len(c.tokens) for c in chunks), tuple(context))
        out = self.model(torch.tensor([tokens]), torch.cat(positions), self.cache.views(meta))
        counts = out.expert_counts if out.router else None
        return StepOutput(out.logits[0, rows], counts)  # (L, V)
