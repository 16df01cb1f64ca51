"""Iteration-level scheduling (continuous batching): which sequences run how many tokens this step.

Every step, running sequences go first (oldest first): a decoding sequence needs one token, a
sequence still in prefill takes the next chunk of its prompt (chunked prefill, so a long prompt
never stalls the decodes beside it). Waiting sequences are admitted while the step has sequence
slots, token budget and KV blocks left. When a running sequence cannot get a block, the newest
running sequence is preempted by recompute: its blocks are released and it waits at the head of
the queue, to be recomputed from its tokens later. Pure Python: no tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moegpt.infer.block_manager import BlockManager
from moegpt.infer.sequence import FinishReason, Sequence, Status


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences per step
    max_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes + draft tokens)
    num_lookahead: int = 0  # speculative draft tokens a sampling sequence may verify per step

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1 or self.num_lookahead < 0:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) and max_batched_tokens "
                             f"({self.max_batched_tokens}) must be >= 1, num_lookahead ({self.num_lookahead}) >= 0")


@dataclass(frozen=True, kw_only=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # the step runs tokens [start, start + num_tokens) of the sequence
    num_tokens: int
    lookahead: int = 0  # draft tokens it may append after them (KV slots are reserved for them)

    @classmethod
    def next_chunk(cls, seq: Sequence, num_tokens: int, lookahead: int = 0) -> "ScheduledSeq":
        return cls(seq=seq, start=seq.num_computed, num_tokens=num_tokens, lookahead=lookahead)

    @property
    def samples_next_token(self) -> bool:
        """Whether this chunk ends at the sequence's last token, so a next token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True, kw_only=True)
class Batch:
    entries: tuple[ScheduledSeq, ...]
    preempted: tuple[int, ...]  # seq_ids preempted while building this batch

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens + e.lookahead for e in self.entries)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first

    def check_fits(self, seq: Sequence) -> None:
        """Raise if the sequence could never fit in the KV cache, even alone."""
        need = len(seq.prompt_ids) + seq.max_tokens + self.config.num_lookahead
        if self.blocks.blocks_needed(need) > self.blocks.num_blocks:
            raise ValueError(f"prompt ({len(seq.prompt_ids)}) + max_tokens ({seq.max_tokens}) needs "
                             f"{self.blocks.blocks_needed(need)} KV blocks; the cache has {self.blocks.num_blocks}")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_tokens(self) -> int:
        """Tokens the waiting sequences still have to compute (their prompts, mostly)."""
        return sum(seq.num_uncomputed for seq in self.waiting)

    def abort(self, seq_id: int) -> Sequence | None:
        return self.finish(seq_id, FinishReason.ABORT)

    def finish(self, seq_id: int, reason: FinishReason) -> Sequence | None:
        """End a sequence now (aborted, or a stop string found outside the scheduler), freeing its blocks."""
        for queue in (self.running, self.waiting):
            for seq in list(queue):
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.blocks.release(seq)
                    seq.finish(reason)
                    return seq
        return None

    def _lookahead(self, seq: Sequence, n: int, budget: int) -> int:
        """Draft slots for a chunk of ``n`` tokens: only when it ends at the last token, never past
        max_tokens (the last accepted draft is followed by one more sampled token), within budget."""
        if n < seq.num_uncomputed:
            return 0
        return max(0, min(self.config.num_lookahead, seq.max_tokens - len(seq.output_ids) - 1, budget - n))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)  # recompute later from its tokens (prompt + output so far)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> Batch:
        budget = self.config.max_batched_tokens
        entries: list[ScheduledSeq] = []
        preempted: list[int] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted by an older sequence in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            extra = self._lookahead(seq, n, budget)
            while not self.blocks.can_grow(seq, n + extra):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.blocks.grow(seq, n + extra)
            entries.append(ScheduledSeq.next_chunk(seq, n, extra))
            budget -= n + extra
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            self.blocks.admit(seq)  # takes its cached prefix, if any
            n = min(seq.num_uncomputed, budget)
            extra = self._lookahead(seq, n, budget)
            if not self.blocks.can_grow(seq, n + extra):
                self.blocks.release(seq)  # not enough blocks yet: it stays at the head of the queue
                break
            self.waiting.popleft()
            self.blocks.grow(seq, n + extra)
            seq.status = Status.RUNNING
            self.running.append(seq)
            entries.append(ScheduledSeq.next_chunk(seq, n, extra))
            budget -= n + extra
        return Batch(entries=tuple(entries), preempted=tuple(preempted))

    def update(self, batch: Batch, sampled: dict[int, list[int]], stop_ids: dict[int, frozenset[int]]) -> list[Sequence]:
        """After the model ran ``batch``: advance each sequence and append its new tokens (one sampled
        token, or accepted draft tokens plus one), finishing at a stop token or max_tokens; tokens
        after that point are dropped. Returns the sequences finished this step."""
        finished = []
        for entry in batch.entries:
            seq = entry.seq
            seq.num_computed = entry.start + entry.num_tokens
            if entry.samples_next_token:
                stops = stop_ids.get(seq.seq_id, frozenset())
                for i, token in enumerate(sampled[seq.seq_id]):
                    seq.output_ids.append(token)
                    seq.num_computed += i > 0  # an accepted draft token: its keys/values are computed
                    if token in stops:
                        seq.finish(FinishReason.STOP)
                    elif len(seq.output_ids) >= seq.max_tokens:
                        seq.finish(FinishReason.LENGTH)
                    if seq.is_finished:
                        break
            self.blocks.register_full_blocks(seq)
            if seq.is_finished:
                self.running.remove(seq)
                self.blocks.release(seq)
                finished.append(seq)
        return finished
