"""The draft-model proposer of speculative decoding: a smaller model of the same tokenizer, run on a
paged cache of its own over the same block tables as the target's.

Each step it first runs over the step's chunks, so its cache stays level with the target's, and
samples a first draft token for each sequence that may propose; then k-1 single-token passes extend
the drafts. Each draft token is drawn, with the sequence's own generator, from the distribution the
target samples from (penalties, temperature, top-k/p, min-p), and that distribution goes with the
proposal so ``verify`` can correct for it.

Legend: P chunks asking for a draft token, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moegpt.infer.runner import Chunk, ModelRunner
from moegpt.infer.sampling import apply_penalties, filtered_probs, sample_from
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import Batch
from moegpt.infer.speculative import Proposal


class DraftModelProposer:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def propose(self, batch: Batch,
                sampling_of: Callable[[int], tuple[SamplingParams, torch.Generator]]) -> dict[int, Proposal]:
        """Draft tokens for the batch's sequences that sample and may look ahead -> {seq_id: Proposal}.
        ``sampling_of(seq_id)``: that sequence's options and random generator."""
        chunks, proposing = [], []
        for e in batch.entries:
            seq, end = e.seq, e.start + e.num_tokens
            k = e.lookahead if e.samples_next_token else 0
            chunks.append(Chunk(tokens=tuple(seq.token_ids[seq.num_draft_computed:end]), start=seq.num_draft_computed,
                                block_table=tuple(seq.block_table), num_logits=1 if k else 0))
            if k:
                proposing.append((e, k))
        logits = self.runner.run(chunks).logits  # (P, V)
        drafts: dict[int, list[int]] = {e.seq.seq_id: [] for e, _ in proposing}
        probs: dict[int, list[torch.Tensor]] = {e.seq.seq_id: [] for e, _ in proposing}
        for i in range(max((k for _, k in proposing), default=0)):
            if i > 0:
                step = [(e, k) for e, k in proposing if k > i]
                chunks = [Chunk(tokens=(drafts[e.seq.seq_id][-1],), start=e.start + e.num_tokens + i - 1,
                                block_table=tuple(e.seq.block_table), num_logits=1, seq_id=e.seq.seq_id)
                          for e, _ in step]
                logits = self.runner.run(chunks).logits
            else:
                step = proposing
            for (e, _), row in zip(step, logits):
                sid = e.seq.seq_id
                params, generator = sampling_of(sid)
                row = apply_penalties(row, params, e.seq.prompt_ids, list(e.seq.output_ids) + drafts[sid])
                if params.greedy:  # certain: the proposal carries no distribution (verify takes it one-hot)
                    drafts[sid].append(int(row.argmax()))
                    continue
                q = filtered_probs(row[None], params)  # (1, V)
                drafts[sid].append(int(sample_from(q, generator)[0]))
                probs[sid].append(q[0])
        for e in batch.entries:
            k = e.lookahead if e.samples_next_token else 0
            e.seq.num_draft_computed = e.start + e.num_tokens + max(k - 1, 0)
        return {sid: Proposal(tokens=tuple(drafts[sid]), probs=torch.stack(probs[sid]) if probs[sid] else None)
                for sid in drafts}
