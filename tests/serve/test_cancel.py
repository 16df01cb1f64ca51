"""A client that hangs up (mid-stream, or while waiting for a whole response) gets its request
aborted at once: generation stops and its KV blocks are free again."""

import asyncio
import contextlib

import httpx

# Sampled, not greedy: the test server speculates by prompt lookup, and greedy text from a random
# model repeats itself, so it would finish 200 tokens in a few steps, before the hang-up lands.
LONG = {"model": "tiny-test", "prompt": "to be, or not", "max_tokens": 200, "ignore_eos": True, "temperature": 1.0,
        "seed": 0}


def _stopped_promptly(server, before: dict) -> None:
    m = server.wait_idle()
    assert m["moegpt:kv_blocks_free"] == m["moegpt:kv_blocks_total"] and m["moegpt:num_requests_running"] == 0
    assert m["moegpt:num_aborted_requests_total"] == before["moegpt:num_aborted_requests_total"] + 1
    # Far fewer than the 200 tokens asked for were generated.
    assert m["moegpt:generation_tokens_total"] - before["moegpt:generation_tokens_total"] < 150


def test_closing_a_stream_aborts_its_request(server):
    before = server.metrics()
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # leaving the block closed the connection mid-stream
    _stopped_promptly(server, before)


def test_giving_up_on_a_whole_response_aborts_its_request(server):
    before = server.metrics()

    async def give_up():
        async with httpx.AsyncClient(timeout=30) as client:
            task = asyncio.ensure_future(client.post(f"{server.url}/v1/chat/completions",
                                                     json={**LONG, "messages": [{"role": "user", "content": "hi"}]}))
            while (await client.get(f"{server.url}/metrics")).text.count("moegpt:num_requests_running 1.0") == 0:
                assert not task.done(), task.result().text
                await asyncio.sleep(0.02)
            task.cancel()  # the connection closes with the response still pending
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(give_up())
    _stopped_promptly(server, before)
