"""SIGTERM: new requests get 503 at once, the request in flight runs to its end, and the process
exits 0."""

import json
import signal
import time

import httpx


def test_sigterm_drains_then_exits_zero(drain_server):
    server = drain_server
    try:
        body = {"model": "tiny-test", "prompt": "to be", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating
            server.proc.send_signal(signal.SIGTERM)
            # No fixed sleep: the whole stream takes a fraction of a second on a fast machine.
            deadline = time.monotonic() + 10
            while httpx.get(f"{server.url}/health", timeout=10).status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.005)
            refused = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # it ran to the end
        t0 = time.monotonic()
        assert server.proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
        assert "draining" in server.log.read_text()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
