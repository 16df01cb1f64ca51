"""Incremental detokenization with stop strings, for streaming.

Text is released as tokens arrive, except a tail that could still turn out to be (the start of) a
stop string, or a multi-byte character whose bytes are not all generated yet. When a stop string
appears, the text is cut before it and the sequence stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Detokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.decode, self.stop = decode, tuple(stop)
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the text already released
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; returns the newly released text. Sets ``stopped`` on a stop string."""
        self.token_ids.extend(token_ids)
        text = self.decode(self.token_ids)
        # Look for a stop string starting anywhere not yet released (it may straddle the boundary).
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0),
                  default=None)
        if cut is not None:
            self.stopped = True
            return self._release(text, max(cut, self.emitted))
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            end -= 1
        # Hold back the longest tail that is a prefix of some stop string.
        end -= max((n for s in self.stop for n in range(1, min(len(s) - 1, end - self.emitted) + 1)
                    if text[end - n:end] == s[:n]), default=0)
        return self._release(text, end)

    def flush(self) -> str:
        """The sequence ended without a stop string: release everything held back."""
        return "" if self.stopped else self._release(self.decode(self.token_ids), None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out
