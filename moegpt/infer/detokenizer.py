"""Incremental detokenization with stop strings, for streaming.

Text is released as tokens arrive, except a tail that could still turn out to be (the start of) a
stop string, or a multi-byte character whose bytes are not all generated yet. When a stop string
appears, the text is cut before it and the sequence stops.

The cost of a token does not grow with the completion: only a short window of tokens is decoded
(the algorithm of the `tokenizers` library's ``DecodeStream``, and of vLLM and TGI): the tokens of
the last released piece, decoded again as context (so decoders that look at their neighbours, such
as sentencepiece's leading-space strip, see it), plus the tokens not yet released. When the window
decodes to more than its context, and not to a cut UTF-8 character, the new text is released and the
window moves on (tokens without text, such as skipped special tokens, stay in it until text comes).
Stop strings are looked for in that new text and the few characters before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of a character not all generated yet


class Detokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.decode, self.stop = decode, tuple(stop)
        self.window: list[int] = []  # the last released piece's tokens (the context), then unreleased ones
        self.context = 0  # how many of ``window`` are context
        self.context_text = ""  # decode(window[:context])
        self.held = ""  # decoded text held back: it may be the start of a stop string
        self.released_tail = ""  # the last released characters a stop string could start in
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; returns the newly released text. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""  # nothing after a stop string is ever released
        self.window.extend(token_ids)
        text = self.decode(self.window)
        if len(text) <= len(self.context_text) or text.endswith(REPLACEMENT):
            return ""  # no new text yet (a cut character, or tokens without text): wait for more tokens
        new = text[len(self.context_text):]
        # The window moves on: the tokens just decoded become the next one's context.
        self.window = self.window[self.context:]
        self.context = len(self.window)
        self.context_text = self.decode(self.window)
        return self._release(self.held + new)

    def flush(self) -> str:
        """The sequence ended without a stop string: release everything held back."""
        if self.stopped:
            return ""
        text = self.decode(self.window)
        rest = self.held + text[len(self.context_text):]  # a cut last character comes out as U+FFFD
        self.held, self.window, self.context, self.context_text = "", [], 0, ""
        return rest

    def _release(self, pending: str) -> str:
        """Release ``pending`` up to a stop string (then stop) or up to a tail that may start one."""
        seen = self.released_tail + pending  # a stop may start in text already released
        cuts = [i for i in (seen.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return pending[:max(0, min(cuts) - len(self.released_tail))]
        # Hold back the longest tail that is a proper prefix of some stop string.
        hold = max((n for s in self.stop for n in range(1, min(len(s) - 1, len(pending)) + 1)
                    if pending.endswith(s[:n])), default=0)
        out, self.held = pending[:len(pending) - hold], pending[len(pending) - hold:]
        keep = max((len(s) for s in self.stop), default=1) - 1
        self.released_tail = (self.released_tail + out)[-keep:] if keep else ""
        return out
