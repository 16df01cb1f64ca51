"""Serving throughput and latency: ``moegpt serve`` under 1, 8 and 32 concurrent streaming clients.

Per concurrency: requests/s, output tokens/s, time to first token and inter-token latency (p50 and
p99, measured by the clients), and beside them the same engine's offline throughput (``LLMEngine``
in-process, every request added at once, no HTTP) as the reference the server is measured against.
The model is the tiny preset with random weights (a trained directory can be given with --model);
prompts are 32 token ids, 64 greedy new tokens each, end-of-sequence ignored.

    python -m bench.serve_throughput [--model DIR] [--concurrency 1 8 32] [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import write_result

PROMPT, NEW = 32, 64
ROOT = Path(__file__).resolve().parent.parent


def make_model(directory: Path) -> Path:
    from moegpt.checkpoint.model_dir import save
    from moegpt.config import preset
    from moegpt.data.sources import shakespeare_source
    from moegpt.data.tokenizer import Tokenizer
    from moegpt.model import build_model

    text = shakespeare_source().paths[0].read_text()[:200_000]
    tok = Tokenizer.train([text], vocab_size=1024)
    return save(build_model(preset("tiny"), seed=0), tok, directory)


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(16, vocab, (n, PROMPT), generator=g).tolist()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                arrivals.append(time.perf_counter())
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": arrivals[0] - t0, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens}


async def run_level(url: str, concurrency: int, per_client: int, vocab: int) -> dict:
    work = prompts(concurrency * per_client, vocab)
    results = []

    async def client_loop(i: int):
        async with httpx.AsyncClient(timeout=600) as client:
            for p in work[i::concurrency]:
                results.append(await one_request(client, url, p))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "seconds": wall,
            "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99)}


def offline_tokens_per_s(model_dir: Path, n: int, vocab: int) -> float:
    """The same engine in-process: n requests added at once, stepped to the end, in a thread of its own
    as the server runs it (on a busy CPU, torch's intra-op threads behave very differently when called
    from the main thread)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_offline, model_dir, n, vocab).result()


def _offline(model_dir: Path, n: int, vocab: int) -> float:
    from moegpt.infer.llm import LLM
    from moegpt.infer.sampling_params import SamplingParams

    engine = LLM(model_dir).engine
    req = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    engine.generate(prompts(1, vocab), req)  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(prompts(n, vocab), req)
    return sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t0)


def start_server(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moegpt", "serve", "--model", str(model_dir),
                                 "--served-model-name", "bench", "--port", str(port)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model directory (default: tiny preset, random weights)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp) / "model")
        from moegpt.checkpoint.model_dir import read_config

        vocab = read_config(model_dir).vocab_size
        proc, url = start_server(model_dir, Path(tmp) / "server.log")
        try:
            rows = [asyncio.run(run_level(url, c, args.requests_per_client, vocab)) for c in args.concurrency]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        for row in rows:
            row["offline_engine_tokens_per_s"] = offline_tokens_per_s(model_dir, row["concurrency"], vocab)
    print(f"moegpt serve, {'random tiny' if not args.model else args.model}: prompt {PROMPT} tokens, {NEW} new "
          f"(greedy), streamed; CPU threads {torch.get_num_threads()}")
    print(f"{'clients':>7} {'req/s':>7} {'out tok/s':>10} {'offline tok/s':>14} {'TTFT p50':>9} {'p99':>7} "
          f"{'ITL p50':>8} {'p99':>7}")
    for r in rows:
        print(f"{r['concurrency']:7d} {r['requests_per_s']:7.2f} {r['output_tokens_per_s']:10.1f} "
              f"{r['offline_engine_tokens_per_s']:14.1f} {r['ttft_p50_s'] * 1e3:7.0f}ms {r['ttft_p99_s'] * 1e3:5.0f}ms "
              f"{r['itl_p50_s'] * 1e3:6.1f}ms {r['itl_p99_s'] * 1e3:5.1f}ms")
    print("wrote", write_result("serve_throughput", {"prompt_tokens": PROMPT, "new_tokens": NEW,
                                                     "model": args.model or "tiny (random weights)", "rows": rows}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
