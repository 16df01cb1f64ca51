"""Offline generation over the engine: text prompts in, completions out.

    llm = moegpt.LLM("runs/demo")
    for c in llm.generate(["ROMEO:", "def f(x):"], Request(max_tokens=50, sampling=SamplingParams(0.8), seed=0)):
        print(c.text, c.finish_reason)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moegpt.checkpoint.model_dir import load
from moegpt.infer.engine import EngineConfig, LLMEngine, Request
from moegpt.infer.sequence import FinishReason


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason


class LLM:
    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer = load(model_dir)
        if self.tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer.json")
        self.config = config

    def generate(self, prompts: list[str], request: Request = Request()) -> list[Completion]:
        engine = LLMEngine(self.model, self.config)
        tok = self.tokenizer
        stops = request.stop_token_ids | ({tok.eos_id} if tok.eos_id is not None else set())
        request = Request(request.max_tokens, request.sampling, frozenset(stops), request.seed)
        ids = [engine.add_request(tok.encode(p, add_bos=tok.bos_id is not None), request) for p in prompts]
        tokens: dict[int, list[int]] = {rid: [] for rid in ids}
        reasons: dict[int, FinishReason] = {}
        while engine.has_work:
            for update in engine.step():
                tokens[update.request_id].extend(update.new_token_ids)
                if update.finish_reason is not None:
                    reasons[update.request_id] = update.finish_reason
        out = []
        for prompt, rid in zip(prompts, ids):
            ids_out = tokens[rid]
            if reasons[rid] == FinishReason.STOP:
                ids_out = ids_out[:-1]  # the stop token itself is not part of the text
            out.append(Completion(prompt, tok.decode(ids_out), tuple(tokens[rid]), reasons[rid]))
        return out
