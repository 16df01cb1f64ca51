"""The server's parts in-process: admission limits, request parsing, the chat template, metrics."""

import pytest
import torch

from moegpt.data.tokenizer import Tokenizer
from moegpt.serve.chat import TemplateError, chat_format
from moegpt.serve.engine_loop import Limits, admission_refusal
from moegpt.serve.errors import APIError
from moegpt.serve.metrics import load_imbalance
from moegpt.serve.protocol import ChatCompletionRequest, CompletionRequest, engine_request, parse
from moegpt.train.step import StepMetrics


def test_admission_is_bounded_by_waiting_sequences_and_tokens():
    limits = Limits(max_queued_requests=4, max_queued_tokens=100)
    assert admission_refusal(limits, waiting=0, waiting_tokens=0, new_seqs=50, new_tokens=10_000) is None  # empty queue
    assert admission_refusal(limits, waiting=3, waiting_tokens=10, new_seqs=1, new_tokens=10) is None
    assert "sequences" in admission_refusal(limits, waiting=3, waiting_tokens=10, new_seqs=2, new_tokens=10)
    assert "tokens" in admission_refusal(limits, waiting=1, waiting_tokens=95, new_seqs=1, new_tokens=10)


def test_parse_takes_openai_bodies_and_ignores_unknown_fields():
    req = parse(CompletionRequest, b'{"model": "m", "prompt": [[1, 2], [3]], "n": 2, "stop": "x", "foo": 1}')
    assert req.prompt == [[1, 2], [3]] and req.n == 2 and req.stop_strings() == ("x",)
    er = engine_request(req, 5, None)
    assert er.n == 2 and er.stop == ("x",) and er.sampling.temperature == 1.0
    chat = parse(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": '
                                        b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], '
                                        b'"logprobs": true, "top_logprobs": 3}')
    assert chat.messages[0].text() == "ab" and chat.logprobs_count() == 3


@pytest.mark.parametrize("body,param", [
    (b'{"model": "m", "prompt": "x", "temperature": "1"}', "temperature"),
    (b'{"model": "m", "prompt": "x", "seed": 1.5}', "seed"),
    (b'{"model": "m", "prompt": "x", "top_p": NaN}', "top_p"),
    (b'{"model": "m", "prompt": "x", "best_of": 3}', "best_of"),
    (b'{"model": "m", "prompt": "x", "suffix": "y"}', "suffix"),
])
def test_parse_refuses_with_the_field_named(body, param):
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, body)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["to be or not to be, that is the question\n" * 30], vocab_size=300)


def test_chat_template_is_stored_with_the_tokenizer_and_renders_like_transformers(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == tok.chat_template is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "to be?"},
                {"role": "assistant", "content": "or not"}, {"role": "user", "content": "why?"}]
    ours = chat_format(loaded).render(messages)
    assert ours == ("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nto be?<|im_end|>\n"
                    "<|im_start|>assistant\nor not<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours
    ids = loaded.encode(ours)
    assert ids.count(loaded.token_to_id("<|im_start|>")) == 5  # the specials are single tokens


def test_a_template_that_refuses_gives_a_template_error(tok):
    strict = Tokenizer(tok.hf, "<|bos|>", "<|eos|>", "<|pad|>",
                       "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    fmt = chat_format(strict)
    assert fmt.render([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(TemplateError, match="user first"):
        fmt.render([{"role": "assistant", "content": "a"}])


def test_load_imbalance_is_the_trainers():
    counts = torch.tensor([[5, 1, 0, 2], [3, 3, 3, 3], [0, 0, 0, 0]])
    trainer = StepMetrics(0.0, 0.0, 0.0, 0.0, counts[:2]).load_imbalance
    assert load_imbalance(tuple(map(tuple, counts.tolist()))) == pytest.approx(trainer)
