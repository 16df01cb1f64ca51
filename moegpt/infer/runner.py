"""The one place that turns a step's chunks into tensors: flattened tokens, positions, the paged
attention metadata, then the model, then the logits the engine asked for.

A step in which every chunk is one token (every sequence decoding), or every chunk a few tokens and
few in all (speculative verification: a token and its drafts), runs the decode program (decode.py)
over the model's fused weight views; any other step (prefill chunks) runs the model's forward.

A chunk is a run of consecutive tokens of one sequence (a prefill chunk, a decode token, or a decode
token followed by speculative draft tokens). The engine says how many trailing positions of each
chunk need logits: 1 to sample the next token, k+1 to verify k draft tokens, 0 for a prefill chunk
that does not reach the end of the prompt.

Legend: N tokens in the step (flattened over chunks), L logit rows asked for, V vocab, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.infer.decode import (KERNEL_ASSIGNMENTS, MAX_QUERY_TOKENS, Collectives, decode_layers, decode_logits,
                                 decode_weights, kernel_layers_apply)
from moegpt.infer.decode_batch import DecodeBatchState, DecodeRow
from moegpt.infer.paged_cache import (DecodeBatch, PagedAttentionMetadata, PagedKVCache, block_table_tensor,
                                      slots_by_position)
from moegpt.infer.image_cache import ImageKVCache
from moegpt.model import MoEGPT
from moegpt.model.vision.cross_attention import ImageContext
from moegpt.model.vision.vision_model import VisionMoEGPT


@dataclass(frozen=True, kw_only=True)
class Chunk:
    tokens: tuple[int, ...]  # run at positions [start, start + len(tokens))
    start: int
    block_table: tuple[int, ...]  # physical block of each logical block (covers the chunk's end)
    num_logits: int  # logits of the chunk's last num_logits positions
    seq_id: int | None = None  # the sequence's identity, which lets decode steps keep its metadata in place
    images: tuple[tuple[int, int], ...] = ()  # (position, image cache block) of its sequence's images, in order


@dataclass(frozen=True, kw_only=True)
class StepOutput:
    logits: torch.Tensor | None  # (L, V) the asked-for rows, chunk by chunk in order; None before the last stage
    expert_counts: torch.Tensor | None  # (Lm, E) tokens routed to each expert of its MoE layers this step
    hidden: torch.Tensor | None = None  # (N, D) every token's hidden state, for the next pipeline stage


def attention_metadata(chunks: list[Chunk], block_size: int,
                       device: torch.device | None = None) -> tuple[PagedAttentionMetadata, torch.Tensor]:
    """The step's paged-attention metadata and the positions (N,) of its tokens, on ``device``, built
    with a few vectorised ops whatever the batch size (B sequences, S_max keys of the longest)."""
    B = len(chunks)
    query_lens = tuple(len(c.tokens) for c in chunks)
    context_lens = tuple(c.start + n for c, n in zip(chunks, query_lens))
    S_max = max(context_lens)
    table = block_table_tensor([c.block_table for c in chunks], -(-S_max // block_size), device)  # (B, nb)
    context_slots = slots_by_position(table, block_size, S_max)  # (B, S_max)
    positions = torch.tensor([p for c, n in zip(chunks, query_lens) for p in range(c.start, c.start + n)],
                             device=device)  # (N,)
    seq_of_token = torch.arange(B, device=device).repeat_interleave(torch.tensor(query_lens, device=device))  # (N,)
    slot_mapping = context_slots[seq_of_token, positions]  # (N,)

    decode = None
    one = [i for i, n in enumerate(query_lens) if n == 1]
    if one:
        lens = [context_lens[i] for i in one]
        S_d = max(lens)
        slots = context_slots if len(one) == B else context_slots[torch.tensor(one, device=device)]
        mask = None
        if min(lens) != S_d:
            mask = (torch.arange(S_d, device=device)[None, :]
                    < torch.tensor(lens, device=device)[:, None])[:, None, None]  # (Bd, 1, 1, S_d)
        query_index = (torch.tensor([sum(query_lens[:i]) for i in one], device=device) if len(one) < B
                       else torch.arange(B, device=device))
        decode = DecodeBatch(query_index=query_index, slots=slots[:, :S_d], mask=mask)
    meta = PagedAttentionMetadata(slot_mapping=slot_mapping, query_lens=query_lens, context_lens=context_lens,
                                  context_slots=context_slots, decode=decode)
    return meta, positions


def image_context(chunks: list[Chunk], images: ImageKVCache, device: torch.device) -> ImageContext | None:
    """The step's images as one row of its flattened tokens: each token sees the last image of its
    sequence at or before its position (None where no chunk's sequence has an image)."""
    blocks = sorted({b for c in chunks for _, b in c.images})
    if not blocks:
        return None
    local = {b: i for i, b in enumerate(blocks)}
    seen, sees = [], []
    for c in chunks:
        for p in range(c.start, c.start + len(c.tokens)):
            last = [b for pos, b in c.images if pos <= p]
            seen.append(local[last[-1]] if last else 0)
            sees.append(bool(last))
    image_of_token = torch.tensor([seen], device=device)  # (1, N)
    keys_values = images.gather(torch.tensor(blocks, device=device))
    return ImageContext.cached(image_of_token, torch.tensor([sees], device=device), keys_values)


class ModelRunner:
    """Runs steps of ``model`` (a text model, or a vision model: model/vision) over the paged cache;
    a vision model's image keys and values are read from ``images``.

    A rank of a sharded model (infer/sharded.py) runs its shard: ``comm`` sums the partial outputs
    of tensor-parallel layers and sends rows to the experts of other ranks in the decode program
    (the model's forward does the same through the hooks the sharding put on it); a pipeline stage
    that is not the ``first`` takes the previous stage's hidden states instead of tokens, and one
    that is not the ``last`` hands its hidden states on instead of logits."""

    def __init__(self, model: MoEGPT | VisionMoEGPT, cache: PagedKVCache, images: ImageKVCache | None = None, *,
                 comm: Collectives | None = None, first: bool = True, last: bool = True):
        self.model, self.cache, self.images = model, cache, images
        self.comm, self.first, self.last = comm, first, last
        self.vision = isinstance(model, VisionMoEGPT)
        text = model.text if self.vision else model
        self.weights = decode_weights(text)  # views of the model's parameters (fused in place)
        self.decode_batch = DecodeBatchState(cache.block_size, cache.k[0].device)

    def runs_decode_program(self, chunks: list[Chunk]) -> bool:
        """Every chunk one token (every sequence decoding), or a few tokens each (speculative
        verification, the draft's catching up) and few in all: the decode program, else the model."""
        if all(len(c.tokens) == 1 for c in chunks):
            return True
        cfg = self.model.cfg
        n = sum(len(c.tokens) for c in chunks)
        return (max(len(c.tokens) for c in chunks) <= MAX_QUERY_TOKENS
                and n * cfg.top_k <= KERNEL_ASSIGNMENTS * cfg.n_experts)

    @torch.no_grad()
    def run(self, chunks: list[Chunk], hidden: torch.Tensor | None = None) -> StepOutput:
        """The step's chunks -> logits of the rows they ask for; ``hidden`` (N, D): the previous
        pipeline stage's output for every token (stages after the first)."""
        if self.runs_decode_program(chunks):
            return self.decode(chunks, hidden)
        device = self.cache.k[0].device
        meta, positions = attention_metadata(chunks, self.cache.block_size, device)
        rows, end = [], 0
        for c in chunks:
            end += len(c.tokens)
            rows.extend(range(end - c.num_logits, end))
        tokens = torch.tensor([[t for c in chunks for t in c.tokens]], device=device)  # (1, N)
        images = image_context(chunks, self.images, device) if self.vision else None
        if self.vision:
            x, router = self.model.trunk(tokens, positions, self.cache.views(meta), images)  # (1, N, D)
        else:
            x = self.model.embed(tokens) if self.first else hidden[None]  # (1, N, D)
            x, router = self.model.blocks(x, positions, self.cache.views(meta))  # (1, N, D)
            if self.last:
                x = self.model.norm(x)
        counts = torch.stack([s.expert_counts for s in router]) if router else None
        if not self.last:
            return StepOutput(logits=None, expert_counts=counts, hidden=x[0])
        logits = self.model.head(x[0, rows])  # (L, V): the head only on the rows asked for
        return StepOutput(logits=logits, expert_counts=counts)

    def decode(self, chunks: list[Chunk], hidden: torch.Tensor | None = None) -> StepOutput:
        """The chunks' tokens through the decode program, each token a row at its position (a chunk's
        later tokens see its earlier ones: every row's key is written before any row attends)."""
        rows, wanted, end = [], [], 0
        for c in chunks:
            one = len(c.tokens) == 1  # only a one-token chunk keeps its metadata in place
            rows += [DecodeRow(seq_id=c.seq_id if one else None, position=c.start + j, block_table=c.block_table)
                     for j in range(len(c.tokens))]
            end += len(c.tokens)
            wanted.extend(range(end - c.num_logits, end))
        positions, meta = self.decode_batch.update(rows)
        tokens = torch.tensor([t for c in chunks for t in c.tokens], device=positions.device)  # (N,)
        logit_rows = None if len(wanted) == end else torch.tensor(wanted, dtype=torch.long, device=positions.device)
        images = image_context(chunks, self.images, positions.device) if self.vision else None
        before_layer = None
        if images is not None:  # each decoder layer's gated block on the rows, as one row of tokens
            before_layer = lambda i, x: self.model.cross_attend(i, x[None], images)[0]  # noqa: E731
        w, k, v = self.weights, self.cache.k, self.cache.v
        x = w.embed(tokens) if self.first else hidden  # (N, D)
        x, counts = decode_layers(w, x, positions, k, v, meta, before_layer, self.comm)
        if not self.last:
            return StepOutput(logits=None, expert_counts=counts, hidden=x)
        logits = decode_logits(w, x, logit_rows, fused=kernel_layers_apply(w, x, k))  # (L, V)
        return StepOutput(logits=logits, expert_counts=counts)
