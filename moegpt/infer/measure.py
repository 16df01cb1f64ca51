"""Timings of the engine's decode work, for ``moegpt plan --measure-efficiency``.

The planner (moegpt.planner.local_decode) does the arithmetic and never imports the engine: the CLI
wraps these two functions as the planner's ``DecodeMeasurers``. One times a weight product in the
engine's own layout (moegpt.infer.layout) with the weights cold; the other times LLMEngine's decode
step on a model of a given shape.

Legend: O out features, I in features, n copies of a weight.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from moegpt.config import ModelConfig

POOL_BYTES = 128 * 2**20  # copies of each matrix cycled through: 4x a 32 MB last-level cache (more: same times)
STEPS = 24  # engine decode steps timed per context (the median is kept)
PREFILL_CHUNK = 512  # the primer's prompt in chunks of this many tokens: ~40% faster than whole at 2,048


def weight_product_s(rows: int, out_features: int, in_features: int, in_by_out: bool, dtype: torch.dtype,
                     pool_bytes: int = POOL_BYTES, passes: int = 3, budget_s: float = 1.0) -> float:
    """Median over passes of the seconds one product x (rows, I) @ W.T takes, cycling through copies of
    W that total ``pool_bytes``, so each is read from memory as a decode step reads it, not from the
    cache. ``in_by_out``: the engine may store W (in, out) (layout.py; not a tied embedding table).
    Timed as the decode program multiplies (its ``Matrix``: the C++ kernel at a few rows on a CPU)."""
    from moegpt.infer.decode import Matrix
    from moegpt.infer.layout import store_in_by_out, streams_rows_faster

    O, I = out_features, in_features
    n = max(2, math.ceil(pool_bytes / (O * I * dtype.itemsize)))
    w = torch.empty(n, O, I, dtype=dtype)  # (n, O, I): n copies, as nn.Linear stores a weight
    w.fill_(0.01)  # written: every page its own memory
    if in_by_out and streams_rows_faster(w):
        w = store_in_by_out(w)  # as the engine lays weights out: (n, O, I) views of a (n, I, O) tensor
    x = torch.full((rows, I), 0.01, dtype=dtype)  # (rows, I)
    products = [Matrix(w[i]) for i in range(n)]
    products[0](x)  # warm-up (and the kernels' first build)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < passes and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        for product in products:
            product(x)  # (rows, O)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def decode_step_s(cfg: ModelConfig, batch: int, context: int, dtype: torch.dtype, steps: int = STEPS,
                  block_size: int = 16) -> float:
    """Median seconds of one LLMEngine decode step of ``batch`` greedy sequences whose keys average
    about ``context``; the step that prefills them is not counted.

    The sequences share a prompt prefix of full blocks, prefilled once by a primer request and then
    taken from the prefix cache (one prefill, not ``batch``); each prompt ends in a token of its own,
    so the sequences decode, and route, differently."""
    from moegpt.infer.engine import EngineConfig, LLMEngine
    from moegpt.infer.sampling_params import SamplingParams
    from moegpt.infer.scheduler import SchedulerConfig
    from moegpt.model import build_model

    shared = max(context - steps // 2 - 1, 0) // block_size * block_size  # prefix tokens, whole blocks
    prompt, new = shared + 1, steps + 1  # keys per sequence: prompt + 1 .. prompt + steps, ~context on average
    model = build_model(cfg.replace(max_seq_len=prompt + new), seed=0, dtype=dtype)
    blocks = -(-prompt // block_size) + batch * -(-(new + 1) // block_size) + 1
    engine = LLMEngine(model, EngineConfig(block_size=block_size, num_kv_blocks=blocks, scheduler=SchedulerConfig(
        max_num_seqs=batch, max_batched_tokens=max(PREFILL_CHUNK, batch))))
    g = torch.Generator().manual_seed(0)  # not the global RNG
    prefix = torch.randint(0, cfg.vocab_size, (shared,), generator=g).tolist()
    engine.add_request(prefix + [0], SamplingParams(max_tokens=1, temperature=0))
    while engine.has_work:  # the primer: prefills the shared prefix, in chunks (and warms the engine up)
        engine.step()
    for last in torch.randint(0, cfg.vocab_size, (batch,), generator=g).tolist():
        engine.add_request(prefix + [last], SamplingParams(max_tokens=new, temperature=0))
    first = engine.step()  # each prompt's last token (the rest is cached): not timed
    if len(first) != batch:
        raise RuntimeError(f"--measure-efficiency: {len(first)} of {batch} sequences started in the first step")
    times = []
    while engine.has_work:
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
