"""The official openai client against a running server (speculative decoding by prompt lookup on):
completions and chat, streamed and not, n > 1, stop sequences, seeds, logprobs; then its metrics."""

import threading

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]


def test_completion_reports_text_usage_and_finish_reason(client, server):
    r = client.completions.create(model=server.model, prompt="to be, or", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_streamed_completion_equals_the_whole_one(client, server):
    args = dict(model=server.model, prompt="whether 'tis nobler", max_tokens=12, temperature=0.9, seed=5)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_and_its_stream(client, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "to be?"}]
    args = dict(model=server.model, messages=messages, max_tokens=10, temperature=0.7, seed=11)
    whole = client.chat.completions.create(**args)
    assert whole.object == "chat.completion"
    msg = whole.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_completions_are_independent_and_numbered(client, server):
    r = client.completions.create(model=server.model, prompt=["to be", "or not"], max_tokens=8, n=3,
                                  temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert len({c.text for c in r.choices}) > 1  # different samples
    streamed = list(client.completions.create(model=server.model, prompt=["to be", "or not"], max_tokens=8, n=3,
                                              temperature=1.0, seed=3, stream=True))
    for c in r.choices:
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices[0].index == c.index) == c.text


def test_stop_sequence_cuts_the_text_before_it(client, server):
    args = dict(model=server.model, prompt="arrows of", max_tokens=30, temperature=0.8, seed=21)
    free = client.completions.create(**args).choices[0].text
    assert len(free) >= 6, free
    stop = free[3:6]
    cut = client.completions.create(**args, stop=[stop, "zzzz"]).choices[0]
    assert cut.text == free[:free.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(**args, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_same_seed_gives_the_same_text_even_while_others_run(client, server):
    args = dict(model=server.model, prompt="sea of troubles", max_tokens=16, temperature=1.0, top_p=0.95)
    alone = client.completions.create(**args, seed=1234).choices[0].text
    other_seed = client.completions.create(**args, seed=99).choices[0].text
    assert other_seed != alone

    def noise():
        for i in range(4):
            client.completions.create(model=server.model, prompt="the slings" * (i + 1), max_tokens=20, seed=i)

    threads = [threading.Thread(target=noise) for _ in range(3)]
    for t in threads:
        t.start()
    crowd = [client.completions.create(**args, seed=1234).choices[0].text for _ in range(3)]
    for t in threads:
        t.join()
    assert crowd == [alone] * 3


def test_completion_logprobs(client, server):
    r = client.completions.create(model=server.model, prompt="to take arms", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) == 3
        assert chosen == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely


def test_chat_logprobs(client, server):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2, seed=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_metrics_cover_queue_cache_tokens_latency_speculation_and_expert_load(client, server):
    client.completions.create(model=server.model, prompt="to be, or not to be, to be, or not", max_tokens=8)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("moegpt:num_requests_running", "moegpt:num_requests_waiting", "moegpt:kv_cache_usage_perc",
                 "moegpt:prompt_tokens_total", "moegpt:generation_tokens_total",
                 "moegpt:time_to_first_token_seconds_bucket", "moegpt:inter_token_latency_seconds_bucket",
                 "moegpt:e2e_request_latency_seconds_bucket", "moegpt:num_preemptions_total",
                 "moegpt:num_aborted_requests_total", "moegpt:spec_decode_acceptance_rate",
                 'moegpt:expert_tokens_total{expert="3",layer="1"}', "moegpt:load_imbalance",
                 'moegpt:request_success_total{finish_reason="length"}'):
        assert name in text, name
    m = server.metrics()
    assert m["moegpt:spec_decode_num_draft_tokens_total"] > 0  # this server speculates by prompt lookup
    assert 0 <= m["moegpt:spec_decode_acceptance_rate"] <= 1
    assert m["moegpt:load_imbalance"] >= 1
