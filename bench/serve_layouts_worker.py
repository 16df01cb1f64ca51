"""Rank program of bench.serve_layouts (started by torch.distributed.run): ``serve_layouts_worker.py
MODEL_DIR OUT.json TP PP EP MODE``. MODE ``speed``: rank 0 decodes a prefilled batch through the
sharded engine and writes its tokens/s, every rank's peak memory (RSS) and pipeline times. MODE
``memory``: every rank loads its shard; rank 0 writes each rank's weight bytes and peak RSS."""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
import torch.distributed as dist

from moegpt.infer.engine import EngineConfig
from moegpt.infer.llm import LLM
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import SchedulerConfig
from moegpt.infer.sharded import start
from moegpt.parallel.serving import serve_layout
from moegpt.quant.model import weight_bytes

BATCH, PROMPT, NEW = 8, 32, 32


def peaks_mb() -> list[float]:
    """Every rank's peak RSS (MB), on every rank."""
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    peaks = [torch.zeros_like(rss) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, rss)
    return [float(p) for p in peaks]


def memory(model_dir: str, out: str, tp: int, pp: int, ep: int) -> None:
    world = start(model_dir, serve_layout(tp, pp, ep), timeout_s=300)
    held = torch.tensor([float(weight_bytes(world.model))], dtype=torch.float64)  # packed bytes and scales if quantized
    weights = [torch.zeros_like(held) for _ in range(dist.get_world_size())]
    dist.all_gather(weights, held)
    peaks = peaks_mb()
    if world.is_driver:
        json.dump({"weights_mb": [float(w) / 2**20 for w in weights], "peak_rss_mb": peaks}, open(out, "w"))
    world.close()


def main(model_dir: str, out: str, tp: int, pp: int, ep: int) -> None:
    world = start(model_dir, serve_layout(tp, pp, ep), timeout_s=300)
    config = EngineConfig(kv_cache_bytes=64 * 2**20,
                          scheduler=SchedulerConfig(max_num_seqs=BATCH, max_batched_tokens=BATCH * PROMPT))
    if not world.is_driver:
        world.follow(config)
    else:
        engine = LLM(model_dir, config, shards=world).engine
        g = torch.Generator().manual_seed(0)
        rates = []
        for repeat in range(3):
            for _ in range(BATCH):
                engine.add_request(torch.randint(3, 300, (PROMPT,), generator=g).tolist(),
                                   SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
            engine.step()  # prefill
            tokens, t0 = 0, time.perf_counter()
            while engine.has_work:
                tokens += sum(len(u.new_token_ids) for u in engine.step())
            rates.append(tokens / (time.perf_counter() - t0))
        times = world.stop()
    peaks = peaks_mb()
    if world.is_driver:
        json.dump({"tokens_per_s": sorted(rates)[1], "repeats": rates, "peak_rss_mb": peaks,
                   "bubbles": [t.bubble for t in times],
                   "busy_ms_per_step": [1e3 * t.busy / max(t.steps, 1) for t in times],
                   "wall_ms_per_step": [1e3 * t.wall / max(t.steps, 1) for t in times]}, open(out, "w"))
    world.close()


if __name__ == "__main__":
    (memory if sys.argv[6] == "memory" else main)(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]))
