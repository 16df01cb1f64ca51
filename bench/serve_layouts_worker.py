"""Rank program of bench.serve_layouts (started by torch.distributed.run): ``serve_layouts_worker.py
MODEL_DIR OUT.json TP PP EP``. Rank 0 decodes a prefilled batch through the sharded engine and writes
its tokens/s, every rank's peak memory (RSS) and pipeline times."""

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
from moegpt.parallel.process_group import close_distributed
from moegpt.parallel.serving import serve_layout

BATCH, PROMPT, NEW = 8, 32, 32


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
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    peaks = [torch.zeros_like(rss) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, rss)
    if world.is_driver:
        json.dump({"tokens_per_s": sorted(rates)[1], "repeats": rates, "peak_rss_mb": [float(p) for p in peaks],
                   "bubbles": [t.bubble for t in times]}, open(out, "w"))
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]))
