"""Tokenize sources once into cached token files, pack them into blocks, split train/val.

Caching: each source becomes `cache_dir/{name}-{fingerprint}.npy`, a flat array of token
ids (documents joined by EOS; uint16 when the vocabulary fits, else uint32). The
fingerprint hashes the source files' paths, sizes and mtimes and the tokenizer's JSON, so
editing either re-tokenizes; files are written to a temp name and renamed into place, so
an interrupted run never leaves a truncated cache behind.

Packing: block i of a token range starting at `start` is
`tokens[start + i*seq_len : start + i*seq_len + seq_len + 1]` (stride seq_len), so
input = block[:-1] and target = block[1:], and every token in the range is a target
exactly once. Validation is the contiguous tail of each source (the last `val_fraction`
of its blocks, at least one); training blocks end strictly before it, so no token is shared.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moegpt.atomic import write_atomic
from moegpt.data.sampler import SampledMixture
from moegpt.data.sources import Source, files_signature, iter_documents
from moegpt.data.tokenizer import Tokenizer

CACHE_FORMAT_VERSION = 1  # bump when the on-disk layout or document joining changes
_ENCODE_CHUNK = 64  # documents per encode_batch call: parallel, yet bounded memory


def source_fingerprint(source: Source, tokenizer: Tokenizer) -> str:
    """Hash of the source files (path, size, mtime) and the tokenizer definition."""
    digest = hashlib.sha256(f"moegpt-tokens-v{CACHE_FORMAT_VERSION}\n".encode())
    digest.update(files_signature(source.paths))
    digest.update(tokenizer.to_json().encode("utf-8"))
    digest.update(f"\neos={tokenizer.eos_id}".encode())
    return digest.hexdigest()[:16]


def cache_path(source: Source, tokenizer: Tokenizer, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"{source.name}-{source_fingerprint(source, tokenizer)}.npy"


def tokenize_source(source: Source, tokenizer: Tokenizer, cache_dir: str | Path) -> Path:
    """Return the cached token file of `source`, tokenizing it first if no cache exists."""
    path = cache_path(source, tokenizer, cache_dir)
    if path.is_file():
        return path
    if len(source.paths) > 1 and tokenizer.eos_id is None:
        raise ValueError(f"source {source.name!r} has several documents but the tokenizer has no eos token")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    pieces: list[np.ndarray] = []
    separator = np.array([tokenizer.eos_id if tokenizer.eos_id is not None else 0], dtype=dtype)
    documents = iter_documents(source)
    while chunk := list(itertools.islice(documents, _ENCODE_CHUNK)):
        for ids in tokenizer.encode_batch(chunk):
            if pieces:
                pieces.append(separator)  # EOS between documents, not after the last
            pieces.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, tokens)

    write_atomic(path, save)
    return path


def load_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a cached token file."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read token cache {path}: {exc}") from None
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"token cache {path} has shape {tokens.shape} dtype {tokens.dtype}; want 1-D uint16/uint32")
    return tokens


def split_blocks(n_tokens: int, seq_len: int, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((train_start, n_train), (val_start, n_val)) for a stream of `n_tokens` tokens.

    Val takes the last `val_fraction` of the blocks (at least one) at the very end of the
    stream; train takes as many whole blocks as fit strictly before the val range.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be in (0, 1)")
    n_total = max(0, (n_tokens - 1) // seq_len)
    n_val = max(1, math.floor(val_fraction * n_total + 0.5))
    val_start = n_tokens - (n_val * seq_len + 1)
    n_train = max(0, (val_start - 1) // seq_len)  # train tokens [0, n_train*seq_len + 1) <= val_start
    if n_train < 1:
        raise ValueError(f"{n_tokens} tokens are too few for seq_len {seq_len}: need train and val blocks")
    return (0, n_train), (val_start, n_val)


@dataclass(frozen=True, eq=False)
class BlockView:
    """`n_blocks` blocks of `seq_len + 1` tokens, stride `seq_len`, starting at token `start`."""

    tokens: np.ndarray
    start: int
    n_blocks: int
    seq_len: int

    @property
    def token_range(self) -> tuple[int, int]:
        """Half-open range [begin, end) of the token positions these blocks cover."""
        return self.start, self.start + self.n_blocks * self.seq_len + 1

    def gather(self, block_indices: torch.Tensor) -> torch.Tensor:
        """Blocks as a LongTensor (n, seq_len + 1)."""
        index = block_indices.to(torch.long).numpy()
        if index.size and (index.min() < 0 or index.max() >= self.n_blocks):
            raise ValueError(f"block index out of range [0, {self.n_blocks}): min {index.min()} max {index.max()}")
        rows = (self.start + index * self.seq_len)[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(self.tokens[rows].astype(np.int64))


@dataclass(frozen=True, eq=False)
class MixtureData(SampledMixture):
    """Per-source train and val blocks of a tokenized mixture."""

    sources: tuple[Source, ...]
    seq_len: int
    vocab_size: int
    train: tuple[BlockView, ...]
    val: tuple[BlockView, ...]

    @property
    def train_block_counts(self) -> tuple[int, ...]:
        return tuple(v.n_blocks for v in self.train)

    @property
    def val_block_counts(self) -> tuple[int, ...]:
        return tuple(v.n_blocks for v in self.val)

    def gather(self, samples: torch.Tensor) -> torch.Tensor:
        """Train blocks for sampler output `samples` (n, 2) [source, block] -> LongTensor (n, seq_len + 1)."""
        if samples.ndim != 2 or samples.shape[1] != 2:
            raise ValueError(f"samples must have shape (n, 2), got {tuple(samples.shape)}")
        return self._gather(self.train, samples)

    def _gather(self, views: tuple[BlockView, ...], pairs: torch.Tensor) -> torch.Tensor:
        """Blocks named by ``pairs`` (n, 2) [source, block] from ``views`` -> LongTensor (n, seq_len + 1)."""
        batch = torch.empty(pairs.shape[0], self.seq_len + 1, dtype=torch.long)
        for source in pairs[:, 0].unique().tolist():
            if not 0 <= source < len(views):
                raise ValueError(f"source index {source} out of range [0, {len(views)})")
            mask = pairs[:, 0] == source
            batch[mask] = views[source].gather(pairs[mask, 1])
        return batch

    def source_index(self, source: int | str) -> int:
        if isinstance(source, str):
            if source not in self.names:
                raise ValueError(f"unknown source {source!r}; have {self.names}")
            return self.names.index(source)
        if not 0 <= source < len(self.sources):
            raise ValueError(f"source index {source} out of range [0, {len(self.sources)})")
        return source

    def val_batches(self, batch_size: int, source: int | str | None = None,
                    max_sequences: int | None = None) -> Iterator[torch.Tensor]:
        """Every val block once, in a fixed order, as LongTensors (<= batch_size, seq_len + 1).

        With `source` given, only that source's val blocks (for per-source val loss); with
        `max_sequences`, only the first that many blocks.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        chosen = range(len(self.sources)) if source is None else (self.source_index(source),)
        pairs = torch.cat(
            [torch.stack((torch.full((self.val[s].n_blocks,), s), torch.arange(self.val[s].n_blocks)), 1)
             for s in chosen]
        )
        if max_sequences is not None:
            pairs = pairs[:max_sequences]
        for first in range(0, pairs.shape[0], batch_size):
            yield self._gather(self.val, pairs[first : first + batch_size])

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/token) on val targets of an add-one-smoothed unigram model of train tokens.

        A model that ignores context can do no better than this, so val loss below it shows
        the network learned something beyond token frequencies.
        """
        counts = np.ones(self.vocab_size, dtype=np.float64)  # add-one smoothing
        for view in self.train:
            begin, end = view.token_range
            counts += np.bincount(view.tokens[begin:end], minlength=self.vocab_size)[: self.vocab_size]
        log_probs = np.log(counts / counts.sum())
        # Val targets are exactly the val range minus its first token (stride seq_len).
        targets = np.concatenate([v.tokens[v.token_range[0] + 1 : v.token_range[1]] for v in self.val])
        return float(-log_probs[targets].mean())


def build_mixture(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    seq_len: int,
    cache_dir: str | Path,
    val_fraction: float = 0.05,
) -> MixtureData:
    """Tokenize (or load cached) `sources` and pack each into train and val blocks."""
    if seq_len < 1:
        raise ValueError(f"seq_len {seq_len} must be at least 1")
    if not sources:
        raise ValueError("build_mixture needs at least one source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    train: list[BlockView] = []
    val: list[BlockView] = []
    for source in sources:
        tokens = load_tokens(tokenize_source(source, tokenizer, cache_dir))
        try:
            (train_start, n_train), (val_start, n_val) = split_blocks(len(tokens), seq_len, val_fraction)
        except ValueError as exc:
            raise ValueError(f"source {source.name!r}: {exc}") from None
        train.append(BlockView(tokens, train_start, n_train, seq_len))
        val.append(BlockView(tokens, val_start, n_val, seq_len))
    return MixtureData(tuple(sources), seq_len, tokenizer.vocab_size, tuple(train), tuple(val))
