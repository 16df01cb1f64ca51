"""Tokenizer: training, exact round trips, special ids, save/load and transformers parity."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from moegpt.data import SPECIAL_TOKENS, Tokenizer

UNICODE_SAMPLES = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "héllo wörld, ça va? ñ",
    "日本語のテキスト 中文 한국어",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and zero\u200bwidth",
    "\x00\x01 control \x7f chars",
    "def f(x):\n    return {'a': [1, 2]}\n",
]


def random_unicode(rng: random.Random, length: int) -> str:
    chars = []
    while len(chars) < length:
        code = rng.randrange(0x110000)
        if not 0xD800 <= code <= 0xDFFF:  # lone surrogates are not encodable text
            chars.append(chr(code))
    return "".join(chars)


def test_trained_vocab_size_is_exact(small_text: str) -> None:
    for size in (272, 300, 1000):
        assert Tokenizer.train([small_text], vocab_size=size).vocab_size == size


def test_vocab_too_small_for_bytes_and_specials_is_rejected(small_text: str) -> None:
    with pytest.raises(ValueError, match="271"):
        Tokenizer.train([small_text], vocab_size=271)


def test_tiny_corpus_is_padded_to_requested_vocab_size() -> None:
    tok = Tokenizer.train(["ab ab"], vocab_size=400)
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


def test_special_tokens_have_fixed_leading_ids(tokenizer: Tokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert {"<|im_start|>", "<|im_end|>", "<|image|>", "<|reserved_0|>"} <= set(SPECIAL_TOKENS)


def test_decode_of_encode_round_trips_arbitrary_unicode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    texts = UNICODE_SAMPLES + [random_unicode(rng, rng.randrange(1, 60)) for _ in range(50)]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_adds_no_special_tokens_unless_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("To be, or not to be")
    assert set(ids).isdisjoint(range(len(SPECIAL_TOKENS)))
    assert tokenizer.encode("To be, or not to be", add_bos=True) == [tokenizer.bos_id, *ids]


def test_training_merges_shorten_common_text(tokenizer: Tokenizer, small_text: str) -> None:
    sample = small_text[:5000]
    assert len(tokenizer.encode(sample)) < 0.7 * len(sample.encode("utf-8"))


def test_encode_batch_matches_encode(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_batch(UNICODE_SAMPLES) == [tokenizer.encode(t) for t in UNICODE_SAMPLES]
    assert tokenizer.encode_batch(["a b"], add_bos=True) == [tokenizer.encode("a b", add_bos=True)]


def test_decode_can_keep_or_skip_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hi", add_bos=True) + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special=False) == "<|bos|>hi<|eos|>"


def test_saved_tokenizer_loads_with_same_ids(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path / "tok")
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert [loaded.encode(t) for t in UNICODE_SAMPLES] == [tokenizer.encode(t) for t in UNICODE_SAMPLES]
        assert loaded.fingerprint == tokenizer.fingerprint


def test_transformers_autotokenizer_matches_our_ids(tokenizer: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path, model_max_length=512)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in UNICODE_SAMPLES:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.model_max_length == 512


def test_load_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no_such_model"):
        Tokenizer.load(missing)


def test_load_corrupt_file_names_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def llama_style_tokenizer(small_text: str) -> HFTokenizer:
    """A Llama/Mixtral-like tokenizer: <unk>, <s>, </s> and a template that prepends <s>."""
    from tokenizers import trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    hf.train_from_iterator([small_text[:20_000]], trainer=trainer)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return hf


def test_load_foreign_tokenizer_finds_bos_eos_by_name(small_text: str, tmp_path: Path) -> None:
    llama_style_tokenizer(small_text).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    # The file's template would prepend <s>; our encode must not.
    assert 1 not in tok.encode("To be")
    assert tok.encode("To be", add_bos=True)[0] == 1


def test_tokenizer_config_overrides_special_token_names(small_text: str, tmp_path: Path) -> None:
    llama_style_tokenizer(small_text).save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "</s>"}, "eos_token": "<s>", "pad_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
