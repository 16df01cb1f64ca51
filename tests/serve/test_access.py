"""Access and limits over raw HTTP: --api-key / MOEGPT_API_KEY (401 without the key, /health and /metrics
open), --chat-template FILE, --max-request-bytes (413), and odd bodies that must never get a 5xx."""

import json
import shutil

import httpx
import pytest

from moegpt.data.tokenizer import Tokenizer
from tests.serve.conftest import running, start_server

KEY = "sk-test-0123456789"
OK = {"model": "tiny-test", "prompt": "to be", "max_tokens": 2}
CHAT = {"model": "tiny-test", "messages": [{"role": "user", "content": "to be"}], "max_tokens": 2}
TEMPLATE = "{% for m in messages %}{{ 'Q: ' + m['content'] + '\n' }}{% endfor %}A:"
LIMIT = 4000


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    """'flag': --api-key, --chat-template on a directory without a template, a 4000-byte body limit;
    'env': the key from MOEGPT_API_KEY."""
    root = tmp_path_factory.mktemp("access")
    bare = shutil.copytree(model_dir, root / "no-template")
    config_path = bare / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (root / "template.jinja").write_text(TEMPLATE)
    started = {
        "flag": start_server(bare, "--api-key", KEY, "--chat-template", str(root / "template.jinja"),
                             "--max-request-bytes", str(LIMIT)),
        "env": start_server(model_dir, env={"MOEGPT_API_KEY": KEY}),
    }
    with running(started):
        yield started


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("which", ["flag", "env"])
def test_v1_routes_need_the_key_and_answer_401_with_an_openai_error(keyed, which):
    url = keyed[which].url
    for headers in ({}, auth("wrong"), auth(KEY + "x"), {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/v1/embeddings")):
            r = httpx.request(method, f"{url}{path}", json=OK, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
            assert KEY not in err["message"]
    assert httpx.post(f"{url}/v1/completions", json=OK, headers=auth(KEY), timeout=30).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"authorization": f"bearer {KEY}"}, timeout=30).status_code == 200


@pytest.mark.parametrize("which", ["flag", "env"])
def test_health_and_metrics_stay_open(keyed, which):
    assert httpx.get(f"{keyed[which].url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed[which].url}/metrics", timeout=10).status_code == 200


def test_without_a_key_the_server_is_open(server):
    assert httpx.post(f"{server.url}/v1/completions", json=OK, timeout=30).status_code == 200


def test_chat_template_flag_renders_the_prompt(keyed, model_dir):
    r = httpx.post(f"{keyed['flag'].url}/v1/chat/completions", json=CHAT, headers=auth(KEY), timeout=30)
    assert r.status_code == 200, r.text
    tok = Tokenizer.load(model_dir)
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("Q: to be\nA:"))


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(keyed):
    big = {**OK, "user": "x" * LIMIT}
    r = httpx.post(f"{keyed['flag'].url}/v1/completions", json=big, headers=auth(KEY), timeout=30)
    assert r.status_code == 413, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and str(LIMIT) in r.json()["error"]["message"]
    just_under = {**OK, "user": "x" * (LIMIT - len(json.dumps(OK)) - 20)}
    assert httpx.post(f"{keyed['flag'].url}/v1/completions", json=just_under, headers=auth(KEY),
                      timeout=30).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(keyed):
    """No Content-Length to refuse it by: the bytes are counted as they arrive."""

    def chunks():
        yield b'{"model": "tiny-test", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(f"{keyed['flag'].url}/v1/completions", content=chunks(), headers=auth(KEY), timeout=30)
    assert r.status_code == 413, r.text


def test_default_limit_refuses_a_body_of_several_mib(server):
    r = httpx.post(f"{server.url}/v1/completions", json={**OK, "user": "z" * (5 * 2**20)}, timeout=60)
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("body,content_type", [
    (b"\x00\x01\x02\xff" * 100, "application/json"),
    (b'{"model": "tiny-test", "prompt": "to be", "max_tokens": 1}', "text/plain"),
    (b"model=tiny-test&prompt=x", "application/x-www-form-urlencoded"),
    (b'{"model": "tiny-test", "prompt": {"a": [1, {"b": null}]}}', "application/json"),
    (b'{"model": "tiny-test", "prompt": [1e999]}', "application/json"),
    (b'{"model": "tiny-test", "prompt": [-1]}', "application/json"),
    (b'{"model": "tiny-test", "prompt": "x", "max_tokens": 1e308}', "application/json"),
    (b'{"model": "tiny-test", "prompt": "x", "seed": 99999999999999999999999999}', "application/json"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": [{"type": "text"}]}]}', "application/json"),
    (b'{"model": "tiny-test", "prompt": "x"' + b', "a": 1' * 20000 + b"}", "application/json"),
])
def test_odd_bodies_never_get_a_5xx(server, body, content_type):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": content_type}, timeout=30)
        assert r.status_code < 500, (path, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
