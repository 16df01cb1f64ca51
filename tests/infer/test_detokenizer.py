"""Incremental detokenization: streamed pieces add up to the text, stop strings cut it."""

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
