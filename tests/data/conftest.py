"""Shared fixtures for the data-pipeline tests: a small text sample and a tokenizer trained on it."""

from __future__ import annotations

import pytest

from moegpt.data import Tokenizer, shakespeare_source

SMALL_TEXT_CHARS = 100_000
SMALL_VOCAB = 400


@pytest.fixture(scope="session")
def small_text() -> str:
    """~100 KB of Shakespeare: enough for BPE merges, small enough to train in well under a second."""
    path = shakespeare_source().paths[0]
    return path.read_text(encoding="utf-8")[:SMALL_TEXT_CHARS]


@pytest.fixture(scope="session")
def tokenizer(small_text: str) -> Tokenizer:
    return Tokenizer.train([small_text], vocab_size=SMALL_VOCAB)
