"""What the engine hands back: per-step updates while a request runs, and vLLM-shaped results.

    for o in llm.generate(prompts, SamplingParams(n=2, logprobs=1)):
        o.prompt, o.prompt_token_ids
        for c in o.outputs:   # c.index, c.text, c.token_ids, c.finish_reason ('stop' | 'length'), c.logprobs
            ...

``StepUpdate`` is the streaming unit (one sequence's new tokens and text after a step; the server
sends these). ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` are vLLM's offline result types,
field for field: ``CompletionOutput.logprobs`` is one ``{token_id: Logprob}`` dict per generated
token (the chosen token and the ``logprobs`` most likely), and ``cumulative_logprob`` their sum,
``None`` when logprobs were not asked for. ``OutputCollector`` folds a request's updates into one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from moegpt.infer.sequence import FinishReason


@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 + how many tokens are more likely than this one
    top: tuple[tuple[int, float], ...]  # the most likely (token id, log-probability), best first


@dataclass(frozen=True, kw_only=True)
class StepUpdate:
    request_id: int
    index: int  # which of the request's n completions
    new_token_ids: tuple[int, ...]
    text: str  # newly released text ("" without a tokenizer)
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None  # None while it runs


@dataclass(frozen=True, kw_only=True)
class Logprob:
    logprob: float
    rank: int | None  # 1 = the most likely token
    decoded_token: str | None  # None without a tokenizer


@dataclass(frozen=True, kw_only=True)
class CompletionOutput:
    index: int  # which of the prompt's n completions
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None
    logprobs: tuple[dict[int, Logprob], ...] | None
    finish_reason: str | None  # 'stop' (a stop token or string), 'length' (max_tokens), 'abort'; None while running


@dataclass(frozen=True, kw_only=True)
class RequestOutput:
    request_id: int
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: tuple[int, ...]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass(kw_only=True)
class _Choice:
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class OutputCollector:
    """One request's updates, folded into its ``RequestOutput``."""

    def __init__(self, request_id: int, prompt_token_ids: Iterable[int], n: int, with_logprobs: bool,
                 prompt: str | None = None, decode: Callable[[list[int]], str] | None = None):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, tuple(prompt_token_ids)
        self.with_logprobs, self.decode = with_logprobs, decode
        self.choices = [_Choice() for _ in range(n)]

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def add(self, u: StepUpdate) -> None:
        c = self.choices[u.index]
        c.token_ids.extend(u.new_token_ids)
        c.text.append(u.text)
        if u.logprobs is not None:
            c.logprobs.extend(u.logprobs)
        if u.finish_reason is not None:
            c.finish_reason = u.finish_reason

    def _logprobs(self, lps: list[TokenLogprob]) -> tuple[dict[int, Logprob], ...]:
        def entry(token_id: int, logprob: float, rank: int) -> Logprob:
            return Logprob(logprob=logprob, rank=rank,
                           decoded_token=self.decode([token_id]) if self.decode is not None else None)

        out = []
        for lp in lps:
            d = {t: entry(t, p, r) for r, (t, p) in enumerate(lp.top, start=1)}
            d[lp.token_id] = entry(lp.token_id, lp.logprob, lp.rank)
            out.append(d)
        return tuple(out)

    def output(self) -> RequestOutput:
        outputs = []
        for i, c in enumerate(self.choices):
            lps = self._logprobs(c.logprobs) if self.with_logprobs else None
            outputs.append(CompletionOutput(
                index=i, text="".join(c.text), token_ids=tuple(c.token_ids),
                cumulative_logprob=sum(lp.logprob for lp in c.logprobs) if self.with_logprobs else None,
                logprobs=lps, finish_reason=c.finish_reason.value if c.finish_reason is not None else None))
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             outputs=outputs, finished=self.finished)
