"""Throughput with many concurrent requests of mixed lengths: LLMEngine's continuous batching vs
transformers' static batching with padding, on ``small`` (random weights, fp32), greedy.

Requests: ``--requests`` (64) prompts and output lengths drawn from a ShareGPT-like distribution
(log-normal, long-tailed; fixed seed), all arriving at time 0.
- moegpt: every request is added to one LLMEngine (max 64 sequences and 2048 tokens per step,
  chunked prefill); a request's latency is when its last token comes out.
- transformers: the same requests in arrival order, ``--hf-batch`` (16) at a time, each batch
  left-padded to its longest prompt and generating its longest output for every row (static
  batching: a short request waits for the batch's longest); a request's latency is when its batch
  ends, counting the batches before it.
Throughput = generated tokens the requests asked for / wall time (padding and overshoot excluded).
Roofline: decode at batch 64 and the mean context (bench/roofline.py: the planner's expected
fraction of experts read, 1 - (1 - k/E)^B, plus KV), prefill at the fp32 matmul peak; the workload
bound adds the prefill time of every prompt to the decode time of every output token at that rate.

    python -m bench.continuous_batching [--requests 64] [--hf-batch 16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import transformers

from bench.common import write_result
from bench.roofline import best_of, decode_roofline, measure_machine
from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.counts import forward_flops_per_token
from moegpt.counts import kv_cache_bytes_per_token
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import SchedulerConfig
from moegpt.model import build_model

DEFAULT_PRESET, MAX_SEQS, MAX_BATCHED = "small", 64, 2048


def sharegpt_like(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs: log-normal, long-tailed, clipped (ShareGPT's shape,
    scaled to a CPU: median prompt ~100 tokens, median output ~60)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.empty(n).log_normal_(math.log(100), 0.8, generator=g).clamp(8, 512)
    output = torch.empty(n).log_normal_(math.log(60), 0.7, generator=g).clamp(4, 256)
    return [(int(p), int(o)) for p, o in zip(prompt, output)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


@torch.no_grad()
def run_ours(model, prompts: list[list[int]], outputs: list[int]) -> dict:
    need = sum(len(p) + o for p, o in zip(prompts, outputs)) + MAX_SEQS * 16
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=need * kv_cache_bytes_per_token(model.cfg, torch.float32.itemsize),
                                           scheduler=SchedulerConfig(max_num_seqs=MAX_SEQS, max_batched_tokens=MAX_BATCHED)))
    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=o, temperature=0)) for p, o in zip(prompts, outputs)]
    done, batch_sizes = {}, []
    while engine.has_work:
        updates = engine.step()
        batch_sizes.append(engine.stats.running)
        now = time.perf_counter() - t0
        for u in updates:
            if u.finish_reason is not None:
                done[u.request_id] = now
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies": [done[i] for i in ids], "steps": engine.stats.steps,
            "preemptions": engine.stats.preemptions, "mean_running": statistics.mean(batch_sizes)}


@torch.no_grad()
def run_hf(hf, prompts: list[list[int]], outputs: list[int], batch: int) -> dict:
    latencies, t0 = [], time.perf_counter()
    for s in range(0, len(prompts), batch):
        ps, os_ = prompts[s:s + batch], outputs[s:s + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(os_), min_new_tokens=max(os_),
                    do_sample=False, pad_token_id=0)
        latencies += [time.perf_counter() - t0] * len(ps)
    return {"wall_s": time.perf_counter() - t0, "latencies": latencies}


def summary(run: dict, tokens: int) -> dict:
    lat = run["latencies"]
    return {**{k: v for k, v in run.items() if k != "latencies"}, "tokens_per_s": tokens / run["wall_s"],
            "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="a smaller one (tiny) for a quick smoke run")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    cfg = preset(args.preset)
    lengths = sharegpt_like(args.requests, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(1, cfg.vocab_size, (p,), generator=g).tolist() for p, _ in lengths]
    outputs = [o for _, o in lengths]
    tokens, prompt_tokens = sum(outputs), sum(len(p) for p in prompts)
    model = build_model(cfg, seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        save(model, None, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    before = measure_machine()
    ours = summary(run_ours(model, prompts, outputs), tokens)
    theirs = summary(run_hf(hf, prompts, outputs, args.hf_batch), tokens)
    machine = best_of(before, measure_machine())
    batch = min(MAX_SEQS, args.requests)
    context = statistics.mean(len(p) + o / 2 for p, o in zip(prompts, outputs))
    roof = decode_roofline(cfg, machine, batch, context, 4)
    prefill_s = sum(len(p) * forward_flops_per_token(cfg, len(p) // 2) for p in prompts) / machine.fp32_flops
    workload_bound = tokens / (prefill_s + tokens / roof["tokens_per_s"])
    print(f"{args.requests} requests, {args.preset} fp32, prompts {prompt_tokens} tokens (median "
          f"{statistics.median(map(len, prompts)):.0f}, max {max(map(len, prompts))}), outputs {tokens} tokens "
          f"(median {statistics.median(outputs):.0f}, max {max(outputs)}); {torch.get_num_threads()} threads, "
          f"read {machine.read_bytes_per_s / 1e9:.1f} GB/s, fp32 {machine.fp32_flops / 1e9:.0f} GFLOP/s (best of before and after)")
    ours["decode_roofline_fraction"] = ours["tokens_per_s"] / roof["tokens_per_s"]
    ours["workload_roofline_fraction"] = ours["tokens_per_s"] / workload_bound
    for name, r in (("moegpt (continuous)", ours), (f"transformers (static, batch {args.hf_batch})", theirs)):
        print(f"{name:>34}: {r['tokens_per_s']:7.1f} tok/s   latency p50 {r['latency_p50_s']:6.1f} s  "
              f"p99 {r['latency_p99_s']:6.1f} s   wall {r['wall_s']:6.1f} s")
    speedup = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print(f"speedup {speedup:.2f}x; roofline: decode at batch {batch} {roof['tokens_per_s']:.0f} tok/s "
          f"({roof['bound']}-bound, experts read {roof['experts_read_fraction']:.0%}) -> "
          f"{ours['decode_roofline_fraction']:.0%}; whole workload (prefill + decode) {workload_bound:.0f} tok/s -> "
          f"{ours['workload_roofline_fraction']:.0%}")
    print("wrote", write_result("continuous_batching", {
        "preset": args.preset, "requests": args.requests, "hf_batch": args.hf_batch, "seed": args.seed, "lengths": lengths,
        "output_tokens": tokens, "prompt_tokens": prompt_tokens, "machine_measured": machine.to_dict(),
        "ours": ours, "hf": theirs, "speedup_vs_hf": speedup, "decode_roofline": roof,
        "workload_roofline_tokens_per_s": workload_bound}))


if __name__ == "__main__":
    main()
