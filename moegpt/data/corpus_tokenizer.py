"""Train the tokenizer of a run on its mixture's own text, once, and cache it.

The cache key hashes the sources' files (path, size, mtime) and the vocabulary size, so the same
corpus and size give the same ``tokenizer.json`` without retraining.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

from moegpt.data.sources import Source, iter_documents
from moegpt.data.tokenizer import Tokenizer


def corpus_key(sources: Sequence[Source], vocab_size: int) -> str:
    digest = hashlib.sha256(f"moegpt-tokenizer-v1\nvocab={vocab_size}\n".encode())
    for source in sources:
        for path in source.paths:
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def corpus_tokenizer(sources: Sequence[Source], vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """The byte-level BPE tokenizer of ``sources`` with ``vocab_size`` entries (cached)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokenizer-{corpus_key(sources, vocab_size)}.json"
    if path.is_file():
        return Tokenizer.load(path)
    tokenizer = Tokenizer.train((doc for s in sources for doc in iter_documents(s)), vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(tokenizer.to_json())
    os.replace(tmp, path)
    return tokenizer
