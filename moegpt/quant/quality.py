"""Quality gates for a quantized model: perplexity on held-out text beside the full-precision
model's, and how often the two models' most likely next token agree (top-1 agreement), measured on
the same blocks in one pass. A model is given as a function from input blocks to logits, so the
quantized side can be its forward or the decode program that generation runs.

Legend: B blocks, T tokens per block, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]  # inputs (B, T) -> logits (B, T, V)


@dataclass(frozen=True, kw_only=True)
class Quality:
    perplexity: float  # the quantized model's
    reference_perplexity: float  # the full-precision model's
    top1_agreement: float  # fraction of positions where both models' argmax agree
    tokens: int

    @property
    def perplexity_increase(self) -> float:
        """Relative increase, e.g. 0.01 for +1%."""
        return self.perplexity / self.reference_perplexity - 1.0


@torch.no_grad()
def compare(reference: Logits, quantized: Logits, blocks: Iterable[torch.Tensor]) -> Quality:
    """Both models on ``blocks`` (B, T + 1): next-token cross-entropy of each, and argmax agreement."""
    ce_ref = ce_q = 0.0
    agree = n = 0
    for block in blocks:
        inputs, targets = block[:, :-1], block[:, 1:]  # (B, T)
        a = reference(inputs).float()  # (B, T, V)
        b = quantized(inputs).float()
        ce_ref += F.cross_entropy(a.flatten(0, 1), targets.flatten(), reduction="sum").item()
        ce_q += F.cross_entropy(b.flatten(0, 1), targets.flatten(), reduction="sum").item()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += targets.numel()
    if n == 0:
        raise ValueError("no evaluation tokens")
    return Quality(perplexity=math.exp(ce_q / n), reference_perplexity=math.exp(ce_ref / n), top1_agreement=agree / n,
                   tokens=n)


def gate_failures(q: Quality, max_perplexity_increase: float, min_top1_agreement: float) -> list[str]:
    """Why ``q`` fails the gates (empty: it passes)."""
    failures = []
    if q.perplexity_increase > max_perplexity_increase:
        failures.append(f"perplexity {q.perplexity:.3f} is {q.perplexity_increase:+.2%} over the full-precision "
                        f"{q.reference_perplexity:.3f} (limit {max_perplexity_increase:+.2%})")
    if q.top1_agreement < min_top1_agreement:
        failures.append(f"top-1 agreement {q.top1_agreement:.2%} is below {min_top1_agreement:.2%}")
    return failures
