"""Every per-request option of a generation, in vLLM's names and defaults.

    SamplingParams(n=2, temperature=0.8, top_p=0.95, stop=["\\n\\n"], max_tokens=64, seed=0)

A ``vllm.SamplingParams(...)`` call with these options builds the same request here. vLLM
compatibility: ``top_k=-1`` (or 0) means no top-k, as in vLLM, and is stored as ``None``; ``top_p=1.0`` and ``min_p=0.0`` filter
nothing; ``stop`` may be one string or a list, stored as a tuple; ``stop_token_ids`` a list, stored
as a tuple. The math that uses these options is in ``moegpt.infer.sampling``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


def _stop_strings(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


INTS = ("n", "top_k", "seed", "max_tokens", "logprobs")  # None allowed except for n
NUMBERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _check_types(p: "SamplingParams") -> None:
    """One-line errors naming the field for values of the wrong type (before any arithmetic on them)."""
    for name in INTS:
        v = getattr(p, name)
        if not (_is_int(v) or (v is None and name != "n")):
            raise ValueError(f"{name}={v!r} must be an integer" + ("" if name == "n" else " or None"))
    for name in NUMBERS:
        v = getattr(p, name)
        if not _is_number(v) or v != v:  # NaN
            raise ValueError(f"{name}={v!r} must be a number")
    if not isinstance(p.ignore_eos, bool):
        raise ValueError(f"ignore_eos={p.ignore_eos!r} must be true or false")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    n: int = 1  # independent completions of the prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int | None = None  # keep the k most likely; None (vLLM: -1 or 0) keeps all
    min_p: float = 0.0  # drop tokens below min_p * the top token's probability
    seed: int | None = None  # None: a fresh random seed
    stop: str | tuple[str, ...] | None = None  # stop strings (the engine needs a tokenizer); text is cut before them
    stop_token_ids: tuple[int, ...] | None = None  # tokens that end the completion (kept in its token ids)
    ignore_eos: bool = False  # keep going past the tokenizer's end-of-sequence token
    max_tokens: int | None = 16  # vLLM's default; None: up to the model's context
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: also the N most likely
    presence_penalty: float = 0.0  # OpenAI-style: subtract once from every token already generated
    frequency_penalty: float = 0.0  # ... and this times how often it was generated
    repetition_penalty: float = 1.0  # CTRL-style: divide positive logits of seen tokens, multiply negative

    def __post_init__(self):
        _check_types(self)
        set_ = object.__setattr__  # normalise vLLM's spellings once, here (the dataclass is frozen)
        if self.top_k is not None and self.top_k in (-1, 0):
            set_(self, "top_k", None)
        set_(self, "stop", _stop_strings(self.stop))
        set_(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1, or -1 / 0 for no top-k")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)!r}: stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)!r} must be token ids (ints >= 0)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-2, 2]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
