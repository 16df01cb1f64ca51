"""Offline generation over the engine: text prompts in, completions out.

    llm = moegpt.LLM("runs/demo")
    for c in llm.generate(["ROMEO:", "def f(x):"], Request(max_tokens=50, sampling=SamplingParams(0.8), seed=0)):
        print(c.text, c.finish_reason)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moegpt.checkpoint.model_dir import load
from moegpt.infer.engine import EngineConfig, LLMEngine, Request, TokenLogprob
from moegpt.infer.sequence import FinishReason


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None
    index: int = 0  # which of the prompt's n completions


@dataclass
class _Pending:
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


class LLM:
    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig(), draft_dir: str | Path | None = None):
        self.model, self.tokenizer = load(model_dir)
        if self.tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer.json")
        self.draft = None
        if draft_dir is not None:
            self.draft, draft_tok = load(draft_dir)
            if draft_tok is None or draft_tok.fingerprint != self.tokenizer.fingerprint:
                raise ValueError(f"draft {draft_dir} does not share the tokenizer of {model_dir}")
        self.config = config
        self.engine = LLMEngine(self.model, config, self.tokenizer, self.draft)

    def generate(self, prompts: list[str], request: Request = Request()) -> list[Completion]:
        """Completions for every prompt (n each, prompt by prompt), run together on the engine."""
        tok, engine = self.tokenizer, self.engine
        ids = [engine.add_request(tok.encode(p, add_special_tokens=True), request) for p in prompts]
        pending = {(rid, i): _Pending(logprobs=[] if request.logprobs is not None else None)
                   for rid in ids for i in range(request.n)}
        while engine.has_work:
            for u in engine.step():
                if (u.request_id, u.index) not in pending:
                    continue  # another caller's request
                p = pending[u.request_id, u.index]
                p.token_ids.extend(u.new_token_ids)
                p.text.append(u.text)
                if u.logprobs is not None:
                    p.logprobs.extend(u.logprobs)
                p.finish_reason = u.finish_reason or p.finish_reason
        return [Completion(prompt, "".join(p.text), tuple(p.token_ids), p.finish_reason,
                           tuple(p.logprobs) if p.logprobs is not None else None, i)
                for prompt, rid in zip(prompts, ids) for i in range(request.n) for p in [pending[rid, i]]]
