"""A request's sequence as the scheduler sees it: token ids, how many have KV in the cache, its
block table, and its state. Pure Python: no tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"


@dataclass(kw_only=True)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0  # leading tokens whose keys/values are in the cache
    num_draft_computed: int = 0  # ... in the draft model's cache (speculative decoding with a draft model)
    block_table: list[int] = field(default_factory=list)  # physical block of each logical block
    # (position, content hash) of each image in the prompt: part of its blocks' prefix-cache names
    image_keys: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt is empty")
        if self.max_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: max_tokens={self.max_tokens} must be >= 1")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
