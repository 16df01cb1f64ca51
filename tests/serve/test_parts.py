"""The server's parts in-process: admission limits, request parsing, the chat template, metrics."""

import asyncio

import pytest
import torch

from moegpt.data.tokenizer import Tokenizer
from moegpt.data.chat import TemplateError, chat_format
from moegpt.serve.engine_loop import EngineLoop, Failed, Limits, admission_refusal
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
    assert er.n == 2 and er.stop == ("x",) and er.temperature == 1.0
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


def test_a_given_template_overrides_the_tokenizers_and_bad_jinja_is_a_one_line_error(tok):
    fmt = chat_format(tok, "{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    assert fmt.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a|b|"
    with pytest.raises(ValueError, match="not valid Jinja"):
        chat_format(tok, "{% for m in messages %}")


def test_load_imbalance_is_the_trainers():
    counts = torch.tensor([[5, 1, 0, 2], [3, 3, 3, 3], [0, 0, 0, 0]])
    trainer = StepMetrics(loss=0.0, aux_loss=0.0, z_loss=0.0, grad_norm=0.0, expert_counts=counts[:2]).load_imbalance
    assert load_imbalance(tuple(map(tuple, counts.tolist()))) == pytest.approx(trainer)


def _tiny_engine():
    from moegpt.config import preset
    from moegpt.infer.engine import EngineConfig, LLMEngine
    from moegpt.model import build_model

    cfg = preset("tiny").replace(vocab_size=64, n_layers=1, d_model=32, n_heads=2, d_ff=32, n_experts=2,
                                 max_seq_len=64)
    return LLMEngine(build_model(cfg, seed=0), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))


async def _drain(stream):
    events = []
    while True:
        e = await stream.events.get()
        events.append(e)
        if isinstance(e, Failed) or e.finish_reason is not None:
            return events


def test_engine_loop_refuses_bad_input_and_survives_a_failing_step():
    from moegpt.infer.sampling_params import SamplingParams

    engine = _tiny_engine()
    step, calls = engine.step, []

    def flaky():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step()

    engine.step = flaky

    async def scenario():
        loop = EngineLoop(engine)
        loop.start(asyncio.get_running_loop())
        with pytest.raises(ValueError, match="empty"):
            await loop.submit([[]], [SamplingParams(max_tokens=2, temperature=0)], 0.0)
        first = await loop.submit([[1, 2, 3]], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)], 0.0)
        events = await _drain(first)
        loop.release(first)
        assert isinstance(events[-1], Failed) and "internal error" in events[-1].message
        second = await loop.submit([[1, 2, 3]], [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)], 0.0)
        events = await _drain(second)
        loop.release(second)
        await asyncio.to_thread(loop.stop)
        assert sum(len(u.new_token_ids) for u in events) == 5 and loop.in_flight == 0
        assert loop.snapshot.kv_blocks_free == loop.snapshot.kv_blocks_total and loop.snapshot.running == 0

    asyncio.run(scenario())


def test_a_failed_shard_fails_every_stream_refuses_new_requests_and_stops_the_server():
    """A sharded model's step or heartbeat raising ShardFailure (a rank died): the streams end with
    the reason, new requests are refused (503), and the server is told to stop."""
    from moegpt.infer.sampling_params import SamplingParams
    from moegpt.infer.sharded import ShardFailure
    from moegpt.serve.engine_loop import ShuttingDown

    engine, stopped = _tiny_engine(), []
    step = engine.step

    def dying():
        if engine.stats.steps == 2:
            raise ShardFailure("rank 1: the sharded step failed (Connection closed by peer)")
        return step()

    engine.step = dying

    async def scenario():
        loop = EngineLoop(engine)
        loop.on_fatal = lambda: stopped.append(True)
        loop.start(asyncio.get_running_loop())
        stream = await loop.submit([[1, 2, 3]], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)], 0.0)
        events = await _drain(stream)
        assert isinstance(events[-1], Failed) and "rank 1" in events[-1].message
        with pytest.raises(ShuttingDown, match="the model is unavailable: rank 1"):
            await loop.submit([[1, 2, 3]], [SamplingParams(max_tokens=2)], 0.0)
        await asyncio.to_thread(loop._thread.join, 10)  # the engine thread ends after telling the server
        assert loop.draining and loop.fatal and stopped == [True] and not loop._thread.is_alive()

    asyncio.run(scenario())


def test_an_idle_engine_loop_sends_heartbeats_and_a_failed_one_is_fatal(monkeypatch):
    import moegpt.serve.engine_loop as engine_loop
    from moegpt.infer.sharded import ShardFailure

    monkeypatch.setattr(engine_loop, "HEARTBEAT_S", 0.01)
    engine, beats = _tiny_engine(), []

    def heartbeat():
        beats.append(1)
        if len(beats) == 3:
            raise ShardFailure("rank 0: the sharded step failed (timeout)")

    engine.heartbeat = heartbeat

    async def scenario():
        loop = EngineLoop(engine)
        loop.start(asyncio.get_running_loop())
        await asyncio.to_thread(loop._thread.join, 10)
        assert not loop._thread.is_alive() and len(beats) == 3 and "timeout" in loop.fatal

    asyncio.run(scenario())


@pytest.mark.parametrize("args,words", [
    (["--model", "{tmp}/nope"], "does not exist"),
    (["--model", "{tmp}", "--port", "70000"], "--port"),
    (["--model", "{tmp}", "--max-queued-requests", "0"], "max_queued_requests"),
])
def test_cli_serve_reports_bad_arguments_in_one_line(capsys, tmp_path, args, words):
    from moegpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("moegpt: error:") and words in err and err.count("\n") == 1
