"""Speculative decoding: cheap proposals, one target pass to score them, exact verification.

A proposer guesses up to k next tokens, each with the distribution q it drew it from; the target
model scores all of them in one forward pass (k+1 positions) and ``verify`` keeps a prefix by
modified rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d is accepted with
probability min(1, p(d)/q(d)); at the first rejection the token is drawn from normalise(max(0, p-q));
if all k are accepted a bonus token is drawn from the target's next distribution. Every emitted
token then follows the target's distribution p exactly, whatever q is; a good q only makes more of
them accepted per pass (the article: the draft proposes 4 tokens, the big model checks them at once).

Proposers: a smaller draft model of the same tokenizer (run by the engine on its own paged cache), or
prompt lookup (n-gram): the tokens that followed the latest earlier occurrence of the sequence's last
n tokens, proposed with certainty (q one-hot), which costs nothing and shines on repetitive text.

Legend: k draft tokens, V vocab.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moegpt.infer.sampling import sample_from


@dataclass(frozen=True, kw_only=True)
class Proposal:
    tokens: tuple[int, ...]  # (k,) proposed continuation
    probs: torch.Tensor | None  # (k, V) the distributions they were drawn from; None: one-hot (certain)


def verify(target_probs: torch.Tensor, proposal: Proposal, generator: torch.Generator | None) -> list[int]:
    """target_probs (k+1, V): the target's sampling distribution at each draft position and one past.
    Returns the accepted draft tokens followed by one token from the target (1 to k+1 tokens)."""
    out: list[int] = []
    for i, d in enumerate(proposal.tokens):
        p = target_probs[i]  # (V,)
        if proposal.probs is None:
            q = torch.zeros_like(p)
            q[d] = 1.0
        else:
            q = proposal.probs[i].to(p.dtype)
        u = float(torch.rand((), generator=generator, dtype=torch.float64, device=target_probs.device))
        if u * float(q[d]) < float(p[d]):  # accept with probability min(1, p(d) / q(d))
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)  # (V,)
        if float(residual.sum()) <= 0:  # p == q up to rounding: fall back to p itself
            residual = p
        out.append(int(sample_from((residual / residual.sum())[None], generator)[0]))
        return out
    out.append(int(sample_from(target_probs[len(proposal.tokens)][None], generator)[0]))
    return out


def verify_greedy(target_tokens: list[int], proposal: Proposal) -> list[int]:
    """``verify`` for a greedy target: target_tokens (k+1,) its argmax at each draft position and one
    past. Its distributions are one-hot, so a draft token is accepted exactly when it is the target's
    and the first one that is not is replaced by the target's (whatever the draft's distribution)."""
    out: list[int] = []
    for d, t in zip(proposal.tokens, target_tokens):
        out.append(t)
        if d != t:
            return out
    out.append(target_tokens[len(proposal.tokens)])
    return out


@dataclass(frozen=True, kw_only=True)
class NgramProposer:
    """Prompt lookup: match the last n tokens (n from max_n down to min_n) at their latest earlier
    occurrence in the sequence and propose what followed it."""

    max_n: int = 3
    min_n: int = 1

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n ({self.min_n}) <= max_n ({self.max_n})")

    def propose(self, token_ids: Sequence[int], k: int) -> Proposal:
        ids = list(token_ids)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest earlier occurrence first
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    return Proposal(tokens=tuple(follow), probs=None)
        return Proposal(tokens=(), probs=None)


# ---- configuration ---------------------------------------------------------------------------


class SpeculativeMethod(enum.Enum):
    DRAFT = "draft"  # a smaller model with the same tokenizer
    NGRAM = "ngram"  # prompt lookup


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    method: SpeculativeMethod = SpeculativeMethod.DRAFT
    num_tokens: int = 4  # draft tokens per step (the article's figure)
    ngram: NgramProposer = NgramProposer()

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"speculative num_tokens={self.num_tokens} must be >= 1")


def speculative_from_flags(draft: bool, ngram: bool, num_tokens: int) -> SpeculativeConfig | None:
    """The speculative config the ``--draft`` / ``--ngram`` / ``--speculative-tokens`` flags ask for."""
    if draft and ngram:
        raise ValueError("--draft and --ngram are two proposers: pick one")
    if not (draft or ngram):
        return None
    method = SpeculativeMethod.DRAFT if draft else SpeculativeMethod.NGRAM
    return SpeculativeConfig(method=method, num_tokens=num_tokens)
