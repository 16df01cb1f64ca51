"""Train the tokenizer of a run on its mixture's own text, once, and cache it.

The cache key hashes the sources' files (path, size, mtime) and the vocabulary size, so the same
corpus and size give the same ``tokenizer.json`` without retraining.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from moegpt.atomic import write_text_atomic
from moegpt.data.sources import Source, files_signature, iter_documents
from moegpt.data.tokenizer import Tokenizer


def corpus_key(sources: Sequence[Source], vocab_size: int) -> str:
    digest = hashlib.sha256(f"moegpt-tokenizer-v1\nvocab={vocab_size}\n".encode())
    for source in sources:
        digest.update(files_signature(source.paths))
    return digest.hexdigest()[:16]


def corpus_tokenizer(sources: Sequence[Source], vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """The byte-level BPE tokenizer of ``sources`` with ``vocab_size`` entries (cached)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokenizer-{corpus_key(sources, vocab_size)}.json"
    if path.is_file():
        return Tokenizer.load(path)
    tokenizer = Tokenizer.train((doc for s in sources for doc in iter_documents(s)), vocab_size)
    write_text_atomic(path, tokenizer.to_json())
    return tokenizer
