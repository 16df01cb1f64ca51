"""Bad input over raw HTTP: each case gets its status and an OpenAI error body, never a 5xx."""

import asyncio
import json

import httpx
import pytest

from tests.serve.conftest import CONTEXT

OK = {"model": "tiny-test", "prompt": "to be", "max_tokens": 2}
CHAT = {"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

CASES = [
    # (name, path, body (bytes or a dict), status, words the message must contain)
    ("malformed json", "/v1/completions", b'{"model": "tiny-test", "prompt": ', 400, "not valid JSON"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("missing prompt", "/v1/completions", {"model": "tiny-test"}, 400, "prompt"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "model"),
    ("prompt of wrong type", "/v1/completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("string for a number", "/v1/completions", {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("number for a boolean", "/v1/completions", {**OK, "stream": 1}, 400, "stream"),
    ("temperature too high", "/v1/completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("top_k below -1", "/v1/completions", {**OK, "top_k": -2}, 400, "top_k"),
    ("top_p zero", "/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("max_tokens zero", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("n zero", "/v1/completions", {**OK, "n": 0}, 400, "n"),
    ("logprobs too many", "/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs"),
    ("penalty out of range", "/v1/completions", {**OK, "presence_penalty": 3}, 400, "presence_penalty"),
    ("empty prompt", "/v1/completions", {**OK, "prompt": ""}, 400, "empty"),
    ("empty prompt list", "/v1/completions", {**OK, "prompt": []}, 400, "empty"),
    ("empty token list in list", "/v1/completions", {**OK, "prompt": [[1, 2], []]}, 400, "empty"),
    ("token outside the vocab", "/v1/completions", {**OK, "prompt": [5, 100000]}, 400, "vocabulary"),
    ("prompt + max_tokens beyond context", "/v1/completions", {**OK, "max_tokens": CONTEXT}, 400, "context"),
    ("prompt alone beyond context", "/v1/completions", {**OK, "prompt": [7] * (CONTEXT + 5)}, 400, "context"),
    ("empty stop string", "/v1/completions", {**OK, "stop": [""]}, 400, "stop"),
    ("too many stop strings", "/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stream_options without stream", "/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("unknown model", "/v1/completions", {**OK, "model": "gpt-4"}, 404, "does not exist"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools"),
    ("logit_bias", "/v1/completions", {**OK, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("echo", "/v1/completions", {**OK, "echo": True}, 400, "echo"),
    ("json response format", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("tool role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "tool"),
    ("image content", "/v1/chat/completions",  # a text-only model (images: tests/serve/test_vision_server.py)
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "takes no images"),
    ("audio content", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "input_audio"),
    ("no messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "role"),
    ("chat model unknown", "/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "does not exist"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "logprobs"),
    ("chat beyond context", "/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT}, 400, "context"),
    # bodies json cannot take: 400, never a 500
    ("100,000 nested [", "/v1/completions", b"[" * 100_000, 400, "nested"),
    ("100,000 nested objects", "/v1/completions", b'{"a":' * 100_000, 400, "nested"),
    ("nested past the depth limit", "/v1/completions", {**OK, "user": json.loads("[" * 40 + "]" * 40)}, 400, "nested"),
    ("an integer of 5000 digits", "/v1/completions", b'{"model": "tiny-test", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "cannot read"),
    ("not UTF-8", "/v1/completions", b'{"model": "tiny-test", "prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ("1e999 temperature", "/v1/completions", b'{"model": "tiny-test", "prompt": "x", "temperature": 1e999}', 400, "temperature"),
    ("NaN temperature", "/v1/completions", b'{"model": "tiny-test", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("lone surrogate", "/v1/completions", b'{"model": "tiny-test", "prompt": "\\ud800", "max_tokens": 1}', 400, "JSON"),
    ("empty body", "/v1/chat/completions", b"", 400, "not valid JSON"),
    ("unknown route", "/v1/embeddings", {"model": "tiny-test", "input": "x"}, 404, "Not Found"),
]


@pytest.mark.parametrize("name,path,body,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_an_openai_error(server, name, path, body, status, words):
    raw = isinstance(body, bytes)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    r = httpx.post(f"{server.url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), err["message"]
    assert "\n" not in err["message"] and "Traceback" not in err["message"]


def test_wrong_method_is_405_with_an_openai_error(server):
    r = httpx.get(f"{server.url}/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_unknown_fields_are_ignored(server):
    r = httpx.post(f"{server.url}/v1/completions", json={**OK, "frobnicate": {"x": 1}, "user": "u1"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_full_queue_gets_429_with_retry_after(tight_server):
    """8 sequences a step and 8 waiting: of 24 long requests at once, some must be refused."""
    body = {"model": "tiny-test", "prompt": "to be", "max_tokens": 60, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{tight_server.url}/v1/completions", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) >= 8, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_queue_bounded_by_prompt_tokens_gets_429(tight_server):
    """250 prompt tokens may wait: 100-token prompts are refused once two or three wait."""
    body = {"model": "tiny-test", "prompt": [40] * 100, "max_tokens": 40, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{tight_server.url}/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in responses)
    assert any("prompt tokens" in r.json()["error"]["message"] for r in refused)
