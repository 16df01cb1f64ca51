"""A bounded load test: 200 requests from 32 concurrent clients on a server with a small batch and a
short queue. A share of the clients disconnect mid-stream (or give up mid-request), a share send bad
input. Every valid request must complete with the right text (greedy requests: the same text as
when run alone), no response may be a 5xx, 429s are retried after a pause, and at the end nothing
runs and every KV block is free."""

import asyncio
import json
import random
import statistics
import time

import httpx

PROMPTS = ["to be, or not", "whether 'tis", "the slings and arrows", "a sea of troubles", "outrageous fortune",
           "nobler in the mind", "to take arms", "that is the question"]
INVALID = [
    {"model": "tiny-test", "prompt": "", "max_tokens": 5},
    {"model": "tiny-test", "prompt": "x", "temperature": -1},
    {"model": "other-model", "prompt": "x"},
    {"model": "tiny-test", "prompt": "x", "max_tokens": 100000},
    {"model": "tiny-test", "prompt": "x", "tools": [{"type": "function"}]},
]
NUM_REQUESTS, CLIENTS, MAX_TOKENS = 200, 32, 12


def greedy(prompt: str, stream: bool) -> dict:
    return {"model": "tiny-test", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


async def post(client: httpx.AsyncClient, url: str, body: dict, stats: dict) -> httpx.Response:
    """POST, retrying while the server says 429 (after a short pause; tests need not wait Retry-After)."""
    while True:
        r = await client.post(url, json=body)
        if r.status_code != 429:
            return r
        assert r.headers.get("retry-after"), r.headers
        stats["429"] += 1
        await asyncio.sleep(random.uniform(0.05, 0.2))


async def stream_text(client: httpx.AsyncClient, url: str, body: dict, stats: dict, stop_after: int | None = None):
    """Streamed text and finish reason; with ``stop_after``, hang up after that many chunks."""
    while True:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code == 429:
                stats["429"] += 1
                await asyncio.sleep(random.uniform(0.05, 0.2))
                continue
            assert r.status_code == 200, await r.aread()
            text, finish, chunks, t0, first = [], None, 0, time.monotonic(), None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                assert "error" not in event, event
                chunks += 1
                if first is None:
                    first = time.monotonic() - t0
                choice = event["choices"][0]
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                finish = choice["finish_reason"] or finish
                if stop_after is not None and chunks >= stop_after:
                    stats["hung_up"] += 1
                    return None, None  # leaving the block closes the connection mid-stream
            stats["ttft"].append(first)
            return "".join(text), finish


async def run_load(url: str, expected: dict[str, str]) -> dict:
    stats = {"429": 0, "hung_up": 0, "gave_up": 0, "codes": [], "ttft": [], "latency": [], "checked": 0}
    rng = random.Random(0)
    jobs: asyncio.Queue = asyncio.Queue()
    for i in range(NUM_REQUESTS):
        jobs.put_nowait(i)

    async def one(client: httpx.AsyncClient, i: int):
        kind, prompt = i % 10, PROMPTS[rng.randrange(len(PROMPTS))]
        t0 = time.monotonic()
        if kind <= 4:  # greedy completions, streamed or not: the same text as alone
            if kind % 2:
                text, finish = await stream_text(client, f"{url}/v1/completions", greedy(prompt, True), stats)
            else:
                r = await post(client, f"{url}/v1/completions", greedy(prompt, False), stats)
                stats["codes"].append(r.status_code)
                assert r.status_code == 200, r.text
                text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
            assert text == expected[prompt] and finish in ("stop", "length")
            stats["checked"] += 1
        elif kind == 5:  # a seeded chat stream
            body = {"model": "tiny-test", "messages": [{"role": "user", "content": prompt}], "max_tokens": 10,
                    "seed": i, "stream": True}
            text, finish = await stream_text(client, f"{url}/v1/chat/completions", body, stats)
            assert finish in ("stop", "length")
        elif kind == 6:  # n = 2 samples, not streamed
            body = {"model": "tiny-test", "prompt": prompt, "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": i}
            r = await post(client, f"{url}/v1/completions", body, stats)
            stats["codes"].append(r.status_code)
            assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        elif kind == 7:  # hangs up mid-stream
            body = {"model": "tiny-test", "prompt": prompt, "max_tokens": 100, "ignore_eos": True, "stream": True}
            await stream_text(client, f"{url}/v1/completions", body, stats, stop_after=2)
            return
        elif kind == 8:  # gives up on a long request before it ends
            body = {"model": "tiny-test", "prompt": prompt, "max_tokens": 150, "ignore_eos": True}
            while True:
                try:
                    r = await client.post(f"{url}/v1/completions", json=body, timeout=0.3)
                except httpx.TimeoutException:
                    stats["gave_up"] += 1
                    return
                if r.status_code != 429:
                    return
                stats["429"] += 1
                await asyncio.sleep(random.uniform(0.05, 0.2))
        else:  # bad input
            r = await client.post(f"{url}/v1/completions", json=INVALID[i % len(INVALID)])
            stats["codes"].append(r.status_code)
            assert r.status_code in (400, 404) and "error" in r.json(), r.text
            return
        stats["latency"].append(time.monotonic() - t0)

    async def worker():
        async with httpx.AsyncClient(timeout=120) as client:
            while not jobs.empty():
                await one(client, jobs.get_nowait())

    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return stats


def test_200_requests_from_32_clients(tight_server):
    url = tight_server.url
    expected = {}
    with httpx.Client(timeout=60) as c:
        for p in PROMPTS:
            expected[p] = c.post(f"{url}/v1/completions", json=greedy(p, False)).json()["choices"][0]["text"]
    t0 = time.monotonic()
    stats = asyncio.run(run_load(url, expected))
    wall = time.monotonic() - t0
    assert not [c for c in stats["codes"] if c >= 500]
    assert stats["checked"] == NUM_REQUESTS // 2
    assert stats["hung_up"] + stats["gave_up"] > 0
    m = tight_server.wait_idle()
    assert m["moegpt:num_requests_running"] == 0 and m["moegpt:num_requests_waiting"] == 0
    assert m["moegpt:kv_blocks_free"] == m["moegpt:kv_blocks_total"]
    assert m["moegpt:num_aborted_requests_total"] > 0
    lat = sorted(stats["latency"])
    print(f"\nload: {NUM_REQUESTS} requests, {CLIENTS} clients, {wall:.1f} s; 429s retried: {stats['429']}; "
          f"hung up mid-stream: {stats['hung_up']}, gave up: {stats['gave_up']}; "
          f"engine aborts: {m['moegpt:num_aborted_requests_total']:.0f}, preemptions: "
          f"{m['moegpt:num_preemptions_total']:.0f}; valid latency p50 {statistics.median(lat):.2f} s, "
          f"p99 {lat[int(0.99 * (len(lat) - 1))]:.2f} s; stream TTFT p50 {statistics.median(stats['ttft']):.3f} s")
