"""Pure schedules: learning rate (linear warmup + cosine decay) and batch-size ramp-up.

The article: the batch size was ramped up over the first days of training to 60M tokens at the
end. Here the global batch grows linearly with tokens seen, from ``start`` sequences to ``full``
sequences over ``ramp_tokens`` tokens, in whole multiples of the micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    peak: float
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1  # cosine decays to peak * min_ratio

    def __post_init__(self):
        if self.peak <= 0:
            raise ValueError(f"lr={self.peak} must be positive")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and steps={self.total_steps} must be >= 0 and > 0")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_ratio} must be in [0, 1]")

    def __call__(self, step: int) -> float:
        """LR for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak * (self.min_ratio + (1 - self.min_ratio) * cosine)


@dataclass(frozen=True, kw_only=True)
class BatchRamp:
    start: int  # sequences per step at the beginning
    full: int  # sequences per step once ramped
    ramp_tokens: int  # tokens over which the batch grows (0: no ramp)
    multiple: int = 1  # batch sizes are multiples of this (the micro-batch)

    def __post_init__(self):
        if not 0 < self.start <= self.full:
            raise ValueError(f"batch_start={self.start} must be in [1, batch_size={self.full}]")
        if self.ramp_tokens < 0:
            raise ValueError(f"ramp_tokens={self.ramp_tokens} must be >= 0")
        if self.multiple <= 0 or self.full % self.multiple != 0:
            raise ValueError(f"batch_size={self.full} is not a multiple of micro_batch={self.multiple}")

    def __call__(self, tokens_seen: int) -> int:
        """Sequences in the next step's batch."""
        if self.ramp_tokens == 0 or tokens_seen >= self.ramp_tokens:
            return self.full
        size = self.start + (self.full - self.start) * tokens_seen / self.ramp_tokens
        rounded = int(size) // self.multiple * self.multiple
        return max(self.multiple, min(self.full, rounded))
