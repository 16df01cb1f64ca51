"""Dataset: token caching and fingerprints, block packing, train/val split, baselines."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moegpt.data import MixtureData, Source, Tokenizer, build_mixture, cache_path, load_tokens, split_blocks

SEQ_LEN = 32


def write_docs(directory: Path, texts: list[str]) -> tuple[Path, ...]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = directory / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return tuple(paths)


@pytest.fixture
def sources(small_text: str, tmp_path: Path) -> tuple[Source, ...]:
    prose = write_docs(tmp_path / "prose", [small_text[:20_000], small_text[20_000:40_000]])
    code_text = "def add(a, b):\n    return a + b\n\n" * 300
    code = write_docs(tmp_path / "code", [code_text, code_text.upper()])
    return Source(name="prose", epochs=2.0, paths=prose), Source(name="code", epochs=4.0, paths=code)


@pytest.fixture
def data(sources: tuple[Source, ...], tokenizer: Tokenizer, tmp_path: Path) -> MixtureData:
    return build_mixture(sources, tokenizer, SEQ_LEN, tmp_path / "cache", val_fraction=0.05)


def test_cache_file_is_written_once_and_reused(
    sources: tuple[Source, ...], tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = build_mixture(sources, tokenizer, SEQ_LEN, cache)
    files = sorted(cache.iterdir())
    assert [f.name.split("-")[0] for f in files] == ["code", "prose"]
    assert all(f.suffix == ".npy" for f in files)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-tokenized although a cache exists")

    monkeypatch.setattr(Tokenizer, "encode_batch", fail)
    second = build_mixture(sources, tokenizer, SEQ_LEN, cache)
    assert sorted(cache.iterdir()) == files
    assert second.train_block_counts == first.train_block_counts


def test_cached_tokens_are_documents_joined_by_eos(
    sources: tuple[Source, ...], tokenizer: Tokenizer, tmp_path: Path
) -> None:
    build_mixture(sources, tokenizer, SEQ_LEN, tmp_path / "cache")
    prose = sources[0]
    tokens = load_tokens(cache_path(prose, tokenizer, tmp_path / "cache"))
    first, second = (tokenizer.encode(p.read_text(encoding="utf-8")) for p in prose.paths)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == first + [tokenizer.eos_id] + second


def test_fingerprint_changes_with_tokenizer_or_file_contents(
    sources: tuple[Source, ...], tokenizer: Tokenizer, small_text: str, tmp_path: Path
) -> None:
    prose = sources[0]
    before = cache_path(prose, tokenizer, tmp_path)
    other = Tokenizer.train([small_text], vocab_size=500)
    assert cache_path(prose, other, tmp_path) != before
    assert cache_path(prose, tokenizer, tmp_path) == before
    prose.paths[0].write_text("changed text", encoding="utf-8")
    os.utime(prose.paths[0], ns=(0, 0))  # a distinct mtime even on coarse-clock filesystems
    assert cache_path(prose, tokenizer, tmp_path) != before


def test_blocks_are_seq_len_plus_one_with_stride_seq_len(data: MixtureData) -> None:
    view = data.train[0]
    tokens = np.asarray(view.tokens, dtype=np.int64)
    blocks = view.gather(torch.arange(view.n_blocks))
    assert blocks.shape == (view.n_blocks, SEQ_LEN + 1)
    assert blocks.dtype == torch.long
    for i in (0, 1, view.n_blocks - 1):
        assert blocks[i].tolist() == tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1].tolist()
    # Stride seq_len: a block's last token (a target) is the next block's first input.
    assert torch.equal(blocks[:-1, -1], blocks[1:, 0])


def test_train_and_val_token_ranges_do_not_overlap(data: MixtureData) -> None:
    for train, val in zip(data.train, data.val):
        assert train.tokens is val.tokens
        assert train.token_range[1] <= val.token_range[0]
        assert val.token_range[1] <= len(val.tokens)
        assert val.n_blocks >= 1 and train.n_blocks >= 1


def test_split_blocks_never_overlaps_and_keeps_val_fraction() -> None:
    for n_tokens in range(2 * 7 + 2, 400, 3):
        (train_start, n_train), (val_start, n_val) = split_blocks(n_tokens, 7, 0.1)
        assert train_start + n_train * 7 + 1 <= val_start
        assert val_start + n_val * 7 + 1 == n_tokens
        assert n_val == max(1, math.floor(0.1 * ((n_tokens - 1) // 7) + 0.5))


def test_split_blocks_rejects_too_short_source() -> None:
    with pytest.raises(ValueError, match="10 tokens"):
        split_blocks(10, 8, 0.05)


def test_gather_maps_sampler_indices_to_train_blocks(data: MixtureData) -> None:
    samples = torch.tensor([[1, 0], [0, 3], [1, 2], [0, 0]])
    batch = data.gather(samples)
    assert batch.shape == (4, SEQ_LEN + 1)
    for row, (source, block) in zip(batch, samples.tolist()):
        assert torch.equal(row, data.train[source].gather(torch.tensor([block]))[0])
    with pytest.raises(ValueError, match="out of range"):
        data.gather(torch.tensor([[0, data.train_block_counts[0]]]))


def test_val_batches_cover_every_val_block_deterministically(data: MixtureData) -> None:
    batches = list(data.val_batches(batch_size=3))
    assert sum(b.shape[0] for b in batches) == sum(data.val_block_counts)
    assert all(b.shape[1] == SEQ_LEN + 1 and b.shape[0] <= 3 for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, data.val_batches(batch_size=3)))
    per_source = torch.cat([torch.cat(list(data.val_batches(2, source=name))) for name in data.names])
    assert torch.equal(per_source, torch.cat(batches))
    with pytest.raises(ValueError, match="'nope'"):
        next(data.val_batches(2, source="nope"))


def test_unigram_entropy_is_between_zero_and_log_vocab(data: MixtureData, tokenizer: Tokenizer) -> None:
    entropy = data.unigram_entropy()
    assert 0.0 < entropy < math.log(tokenizer.vocab_size)


def test_sampler_built_from_data_uses_train_counts_and_epochs(data: MixtureData) -> None:
    sampler = data.make_sampler(seed=3)
    assert sampler.block_counts == data.train_block_counts
    assert sampler.epochs == (2.0, 4.0)
    assert data.gather(sampler.next_batch(5)).shape == (5, SEQ_LEN + 1)
