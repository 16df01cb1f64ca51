"""Fine-tuning data: the assistant mask from the rendering, JSONL checks, packing, the instruction set."""

from __future__ import annotations

import json

import pytest
import torch

from moegpt.data.chat import TemplateError, chat_format
from moegpt.data.instructions import TASKS, instruction_source
from moegpt.data.sft import COPY_SPAN, IGNORE, ConversationSet, build_sft_data, pack, parse_conversation_mixture, read_jsonl

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a king."},
        {"role": "assistant", "content": "Lear"}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Richard"}]


def test_the_loss_covers_exactly_what_the_assistant_writes(tokenizer):
    fmt = chat_format(tokenizer)
    ids, mask = fmt.tokens(tokenizer, CHAT)
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids, skip_special=False) == fmt.render(CHAT, add_generation_prompt=False)
    written = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special=False)
    assert written == "Lear<|im_end|>\nRichard<|im_end|>\n"
    # the prompt pieces are tokenized as the server tokenizes a prompt
    prompt = tokenizer.encode(fmt.render(CHAT[:2], add_generation_prompt=True))  # before the first reply
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])


def test_templates_that_hide_the_assistant_are_errors(tokenizer):
    no_reply = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    with pytest.raises(TemplateError, match="assistant message 2 as nothing"):
        chat_format(tokenizer, no_reply).tokens(tokenizer, CHAT)
    shifting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="do not extend one another at message 2"):
        chat_format(tokenizer, shifting).tokens(tokenizer, CHAT)
    with pytest.raises(TemplateError, match="no assistant message"):
        chat_format(tokenizer).pieces(CHAT[:2])


@pytest.mark.parametrize("line, problem", [
    ("not json", "line 2: not JSON"),
    (json.dumps({"text": "hi"}), 'line 2: want an object with a non-empty "messages" list'),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "line 2: message 0 must be"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "line 2: no assistant message"),
])
def test_a_bad_jsonl_line_is_named_with_its_problem(tmp_path, line, problem):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=problem):
        read_jsonl(path)


def test_jsonl_sources_hold_out_their_tail(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (s,) = parse_conversation_mixture(f"mine={path}:2", val_fraction=0.2)
    assert (s.name, s.epochs, len(s.train), len(s.val)) == ("mine", 2.0, 8, 2)
    assert s.val[-1][-1]["content"] == "a9"
    (text, copy) = parse_conversation_mixture("text:1,copy:2", val_fraction=0.2)
    assert (text.repeat_span, copy.name, copy.epochs, copy.repeat_span) == (None, "copy", 2.0, COPY_SPAN)
    for bad in ("mine=x.jsonl", "instructions:0", "other:1", "copy:0"):
        with pytest.raises(ValueError, match="--data item"):
            parse_conversation_mixture(bad, 0.1)


def test_packing_fills_rows_with_whole_conversations():
    examples = [([1, 2, 3, 4], [False, False, True, True]), ([5, 6, 7], [False, True, True]), ([8, 9], [False, True])]
    b = pack(examples, seq_len=5, pad_id=0)
    assert b.inputs.tolist() == [[1, 2, 3, 5, 6], [8, 0, 0, 0, 0]]
    assert b.targets.tolist() == [[IGNORE, 3, 4, 6, 7], [9, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert b.positions.tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert b.docs[0].tolist() == [0, 0, 0, 1, 1] and len(set(b.docs[1, 1:].tolist())) == 4  # padding: its own
    unpacked = pack(examples, seq_len=5, pad_id=0, packing=False)
    assert len(unpacked) == 3 and unpacked.num_targets == b.num_targets == 5
    with pytest.raises(ValueError, match="conversation 0 has 4 tokens; a row holds 2 to 3"):
        pack(examples, seq_len=2, pad_id=0)


def test_long_conversations_are_dropped_and_counted_or_refused(tokenizer):
    fmt = chat_format(tokenizer)
    short = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    long = ({"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "yo"})
    s = ConversationSet(name="c", epochs=1.0, train=(short, long), val=(short,))
    data = build_sft_data([s], tokenizer, fmt, seq_len=64)
    assert data.dropped == {"c": 1} and data.train_block_counts == (1,)
    with pytest.raises(ValueError, match="training conversation 1: .* tokens is longer than a row"):
        build_sft_data([s], tokenizer, fmt, seq_len=64, drop_long=False)


def test_the_instruction_set_is_reproducible_and_its_held_out_lines_unseen():
    a, b = instruction_source(n_train=50, n_held_out=10), instruction_source(n_train=50, n_held_out=10)
    assert a.train == b.train and a.val == b.val
    assert sorted(set(a.val_tasks)) == sorted(TASKS) and len(a.val) == 10 * len(TASKS)
    train_text = "\n".join(c[0]["content"] for c in a.train)
    for conv, task in zip(a.val, a.val_tasks):
        if task in ("first_word", "last_word", "count_words"):
            assert conv[0]["content"].split("\n", 1)[1] not in train_text
        if task == "count_words":
            assert conv[1]["content"] == str(len(conv[0]["content"].split("\n", 1)[1].split()))
        if task == "last_word":
            assert conv[1]["content"] == "The last word is " + conv[0]["content"].split()[-1]
        if task == "reverse_words":
            words = conv[0]["content"].removeprefix("Reverse the order of these words:").split()
            assert conv[1]["content"].removeprefix("Reversed:").split() == words[::-1]
