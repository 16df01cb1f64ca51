"""Engine updates -> OpenAI response bodies: whole responses, streaming chunks, and logprobs.

A request with P prompts and n completions each has P * n choices; choice ``p * n + i`` is
completion ``i`` of prompt ``p``, as OpenAI numbers them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.outputs import StepUpdate, TokenLogprob

def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_table()


class TokenText:
    """Token id -> its text, for logprobs (cached: the same tokens come back all the time). A token
    that is only part of a UTF-8 character is named by its bytes, ``bytes:\\xe2\\x80``, as OpenAI does."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special=False)
            if "\ufffd" in text:
                piece = self.tokenizer.id_to_token(token_id) or ""
                if piece and all(ch in _BYTE_OF for ch in piece):
                    text = "bytes:" + "".join(f"\\x{_BYTE_OF[ch]:02x}" for ch in piece)
            self.cache[token_id] = text
        return text

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id) or ""
        if piece and all(ch in _BYTE_OF for ch in piece) and not self.tokenizer.decode([token_id]) == piece:
            return [_BYTE_OF[ch] for ch in piece]
        return list(self(token_id).encode("utf-8"))


def completion_logprobs(lps: list[TokenLogprob], text: TokenText, offset: int) -> dict:
    """OpenAI's legacy completions format; ``offset``: characters of the choice's text before these tokens."""
    tokens = [text(lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(i): p for i, p in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], text: TokenText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": text(token_id), "logprob": logprob, "bytes": text.bytes(token_id)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, p) for i, p in lp.top]}
                        for lp in lps]}


@dataclass
class Choice:
    """One choice being collected for a non-streamed response."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    chars: int = 0  # text length so far (completions' text_offset)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Response:
    """Everything a response needs besides the tokens: which endpoint, ids and names."""

    chat: bool
    model: str
    text: TokenText
    want_logprobs: bool
    prompt_tokens: int
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    # ---- non-streamed --------------------------------------------------------------------------
    def whole(self, choices: list[Choice]) -> dict:
        out = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            if self.chat:
                lp = chat_logprobs(c.logprobs, self.text) if self.want_logprobs else None
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            else:
                lp = completion_logprobs(c.logprobs, self.text, 0) if self.want_logprobs else None
                out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": usage(self.prompt_tokens, sum(c.num_tokens for c in choices))}

    # ---- streamed ------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], include_usage: bool) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = None
        return sse(body)

    def role_chunk(self, index: int, include_usage: bool) -> str:
        """A chat stream opens each choice with the assistant's role."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], include_usage)

    def update_chunk(self, index: int, u: StepUpdate, choice: Choice, include_usage: bool) -> str | None:
        """The chunk for one engine update of choice ``index`` (None when it carries nothing)."""
        finish = u.finish_reason.value if u.finish_reason is not None else None  # OpenAI's words
        if not u.text and finish is None and not (self.want_logprobs and u.new_token_ids):
            return None
        lps = list(u.logprobs or ()) if self.want_logprobs else None
        if self.chat:
            delta = {"content": u.text} if u.text or lps else {}
            c = {"index": index, "delta": delta, "logprobs": chat_logprobs(lps, self.text) if lps else None,
                 "finish_reason": finish}
        else:
            c = {"index": index, "text": u.text,
                 "logprobs": completion_logprobs(lps, self.text, choice.chars) if lps is not None else None,
                 "finish_reason": finish}
        return self._chunk([c], include_usage)

    def usage_chunk(self, completion_tokens: int) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(self.prompt_tokens, completion_tokens)}
        return sse(body)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def collect(choice: Choice, u: StepUpdate) -> None:
    """Add an update to a choice (streamed or not)."""
    choice.text.append(u.text)
    choice.chars += len(u.text)
    choice.num_tokens += len(u.new_token_ids)
    if u.logprobs is not None:
        choice.logprobs.extend(u.logprobs)
    if u.finish_reason is not None:
        choice.finish_reason = u.finish_reason.value
