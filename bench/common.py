"""Shared bench helpers: timing with medians, an engine with a batch prefilled, and writing JSON results."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def interleaved_medians(fns, repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each function, run in turn (a, b, a, b, ...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def prefilled_engine(model, batch: int, prompt: int, new: int, seed: int, kv_cache_bytes: int,
                     kv_cache_dtype: str = "auto"):
    """An LLMEngine holding ``batch`` random prompts of ``prompt`` tokens (``new`` greedy tokens each),
    all prefilled by its first step -> (engine, that step's updates). Every later step decodes."""
    from moegpt.infer.engine import EngineConfig, LLMEngine
    from moegpt.infer.sampling_params import SamplingParams
    from moegpt.infer.scheduler import SchedulerConfig

    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=kv_cache_bytes, kv_cache_dtype=kv_cache_dtype,
                                           scheduler=SchedulerConfig(max_num_seqs=batch,
                                                                     max_batched_tokens=batch * prompt)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        engine.add_request(torch.randint(0, model.cfg.vocab_size, (prompt,), generator=g).tolist(),
                           SamplingParams(max_tokens=new, temperature=0))
    return engine, engine.step()


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
