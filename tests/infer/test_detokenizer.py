"""Incremental detokenization: streamed pieces add up to the text, stop strings cut it."""

import pytest

from moegpt.infer.detokenizer import Detokenizer

VOCAB = {0: "he", 1: "llo", 2: " wo", 3: "rld", 4: "\n", 5: "EN", 6: "D", 7: "!"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def stream(ids, stop=()):
    d = Detokenizer(decode, stop)
    pieces = []
    for i in ids:
        pieces.append(d.add([i]))
        if d.stopped:
            break
    pieces.append(d.flush())
    return pieces, d.stopped


def test_pieces_add_up_to_the_whole_text():
    pieces, stopped = stream([0, 1, 2, 3, 4])
    assert "".join(pieces) == "hello world\n" and not stopped


def test_stop_string_across_tokens_cuts_before_it_and_is_never_released():
    pieces, stopped = stream([0, 1, 4, 5, 6, 7, 2], stop=("END",))
    assert stopped and "".join(pieces) == "hello\n"
    assert "EN" not in "".join(pieces)


def test_a_held_back_prefix_that_is_not_a_stop_is_released_later():
    pieces, stopped = stream([0, 5, 7], stop=("END",))
    assert not stopped and "".join(pieces) == "heEN!"
    assert pieces[1] == ""  # "EN" could still become "END": held back


def test_incomplete_utf8_waits_for_its_other_bytes():
    raw = "é".encode()
    d = Detokenizer(lambda ids: bytes(raw[:len(ids)]).decode("utf-8", errors="replace"))
    assert d.add([0]) == ""
    assert d.add([1]) == "é"


# ---- real tokenizers: pieces add up to the full decode, at a cost that does not grow -----------------
TEXTS = ["to be, or not to be: 你好世界 🤗🎉👩‍👩‍👧 ñ ü — ∑ 𝄞 done.\n", "  leading spaces, tabs\tand\nnewlines  "]


def byte_level_tokenizer():
    from moegpt.data.tokenizer import Tokenizer

    return Tokenizer.train(["to be, or not to be, that is the question\n" * 40], vocab_size=300)


def stream_pieces(tok, ids, stop=()):
    calls = []

    def decode(window):
        calls.append(len(window))
        return tok.decode(window)

    d = Detokenizer(decode, stop)
    pieces = [d.add([t]) for t in ids] + [d.flush()]
    return pieces, calls


def test_streamed_text_is_the_full_decode_with_multibyte_characters_split_across_tokens():
    tok = byte_level_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert len(ids) > len(text.encode("utf-8")) // 2  # mostly single bytes: characters are split
        pieces, _ = stream_pieces(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)  # a character is released whole, never half


def test_streamed_text_matches_the_tokenizers_decode_stream():
    from tokenizers.decoders import DecodeStream

    tok = byte_level_tokenizer()
    ids = tok.encode(TEXTS[0])
    stream = DecodeStream(skip_special_tokens=True)
    theirs = "".join(piece or "" for piece in (stream.step(tok.hf, t) for t in ids))
    assert "".join(stream_pieces(tok, ids)[0]) == theirs


def test_a_sentencepiece_tokenizer_streams_its_leading_spaces_and_byte_fallback(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from moegpt.data.tokenizer import Tokenizer

    (tmp_path / "c.txt").write_text("to be, or not to be, that is the question\n" * 40 + "ça va 你好\n" * 5)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   hard_vocab_limit=False, byte_fallback=True, model_type="bpe", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    tok = Tokenizer.load(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert "".join(stream_pieces(tok, ids)[0]) == tok.decode(ids)


def test_cost_per_token_does_not_grow_with_the_completion():
    """Tokens handed to decode per call: the same few at token 20 as at token 4,000."""
    tok = byte_level_tokenizer()
    ids = tok.encode(TEXTS[0] * 80)  # ~4,000 tokens
    assert len(ids) > 3000
    pieces, calls = stream_pieces(tok, ids, stop=("never appears",))
    assert "".join(pieces) == tok.decode(ids)
    assert max(calls) <= 8  # the longest character (4 bytes) plus its context
    assert len(calls) <= 2 * len(ids) + 1  # at most two decodes a token


def test_stop_string_on_a_real_tokenizer_cuts_the_text_before_it():
    tok = byte_level_tokenizer()
    ids = tok.encode("to be, or 你好 not to be, that is")
    for stop, before in ((("not to",), "to be, or 你好 "), (("好 n",), "to be, or 你"), (("is",), "to be, or 你好 not to be, that ")):
        pieces, _ = stream_pieces(tok, ids, stop=stop)
        assert "".join(pieces) == before, stop
