"""Exact match of greedy chat answers: what instruction tuning is judged by.

Each held-out conversation's last message is the reference answer; the model is sent the rest
rendered with the generation prompt (as the server sends a chat request) and decodes greedily until
its chat stop token; the answer matches when the text equals the reference (surrounding whitespace
ignored).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from moegpt.data.chat import ChatFormat
from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import MoEGPT


def exact_match(model: MoEGPT, tokenizer: Tokenizer, fmt: ChatFormat, conversations: Sequence[Sequence[dict]],
                tasks: Sequence[str | None], max_tokens: int = 32) -> dict[str, dict]:
    """{task: {"n", "correct", "exact_match"}} over ``conversations`` (their last message the
    assistant's reference answer), plus "all" over every one; tasks None count under "all" only."""
    engine = LLMEngine(model, EngineConfig(), tokenizer)
    prompts, answers = [], []
    for conv in conversations:
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError("an evaluation conversation must end with the assistant's reference answer")
        prompts.append(tokenizer.encode(fmt.render(list(conv[:-1]), add_generation_prompt=True)))
        answers.append(conv[-1]["content"].strip())
    stops = sorted(fmt.stop_token_ids)
    # an answer may use what is left of the context (a prompt that fills it gets no answer: wrong)
    room = [min(max_tokens, engine.max_len - len(p)) for p in prompts]
    asked = [i for i, r in enumerate(room) if r > 0]
    generated = engine.generate([prompts[i] for i in asked],
                                [SamplingParams(temperature=0.0, max_tokens=room[i], stop_token_ids=stops) for i in asked])
    texts = [""] * len(prompts)
    for i, out in zip(asked, generated):
        texts[i] = out.outputs[0].text
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for text, answer, task in zip(texts, answers, tasks or [None] * len(answers)):
        hit = int(text.strip() == answer)
        for key in ("all",) + ((task,) if task else ()):
            tally[key][0] += 1
            tally[key][1] += hit
    return {k: {"n": n, "correct": c, "exact_match": c / n} for k, (n, c) in tally.items()}
