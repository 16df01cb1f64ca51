"""Decode steps of the engine against this machine's read bandwidth measured *paired* with each
timing: a sum over a 1 GiB array, the timed steps, the sum again (this machine's bandwidth switches
between levels every 10-30 s, so a bound from another moment mis-states a fraction by 10-40%).

For each dtype and batch: ``small`` with random weights, prompts of 128 tokens prefilled, then
repetitions of ``--steps`` decode steps. The bytes a step reads are counted from what it did: every
shared weight (attention, norms, routers, the LM head), the embedding rows looked up, the experts the
step's tokens chose (from the engine's per-step expert counts) and each sequence's KV. A
repetition's fraction is those bytes per second over the mean of its two sums; a repetition whose
sums differ by more than 15% is dropped; best and median of the rest are reported.

Rows: the decode program with the C++ kernels, and the same program in PyTorch ops (the fallback
without a compiler; full-precision weights only); with ``--schemes``, also the model's weights
quantized (moegpt/quant: int8 per channel, int4 in groups of 32, the embedding table too), whose
bytes are the packed bytes and scales as stored (each row also gives the model's stored weight bytes
over its fp32 bytes); with ``--kv-cache-dtypes``, an 8-bit KV cache too.

    python -m bench.decode_paired [--dtypes fp32 bf16] [--batches 1 16] [--repeats 7] [--steps 16]
                                  [--schemes none int8 int4]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

import torch

import moegpt.infer.decode as decode
from bench.common import prefilled_engine, write_result
from moegpt.config import preset
from moegpt.counts import KV_SCALE_BYTES, kv_cache_bytes_per_token
from moegpt.model import build_model
from moegpt.quant.model import EMBEDDING, quantize_model, stored_tensors, targets
from moegpt.quant.model import weight_bytes as stored_weight_bytes  # (this module's weight_bytes: a step's)
from moegpt.quant.scheme import parse_scheme

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = 128
SUM_BYTES = 2**30


def sum_bandwidth(a: torch.Tensor) -> float:
    t0 = time.perf_counter()
    a.sum()
    return a.numel() * a.element_size() / (time.perf_counter() - t0)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes every step reads whatever the batch: attention, norms, routers, the LM head; bytes of one
    expert of one layer), as the weights are stored (packed bytes and scales when quantized)."""
    expert_stacks = [t for t in targets(model) if ".experts." in t.name]
    expert = nbytes(x for t in expert_stacks for x in stored_tensors(t.module, t.attr))
    expert //= len(expert_stacks) // 3 * model.cfg.n_experts if expert_stacks else 1
    # (a lookup reads one row of the embedding table per token: not counted, quantized or not)
    others = [x for t in targets(model) if ".experts." not in t.name and t.name != EMBEDDING
              for x in stored_tensors(t.module, t.attr)]
    counted = {id(x) for x in others}  # (a full-precision target is a plain parameter too: count it once)
    plain = [p for n, p in model.named_parameters() if ".parametrizations." not in n and "experts" not in n
             and n != EMBEDDING and id(p) not in counted]
    head = [model.embed.weight] if model.lm_head is None else []  # the table is read as the head if tied
    return nbytes(others + plain + head), expert


def step_bytes(cfg, weights: tuple[int, int], engine, itemsize: int, kv_per_token: int) -> int:
    """Bytes the engine's last step read (see the module docstring); weights: ``weight_bytes(model)``."""
    shared, expert = weights
    seqs = [s for s in engine.scheduler.running]
    B = len(seqs)
    hit = int((engine.stats.last_expert_counts > 0).sum()) if engine.stats.last_expert_counts is not None else 0
    kv = sum(len(s.token_ids) for s in seqs) * kv_per_token
    return shared + B * cfg.d_model * itemsize + hit * expert + kv


@contextlib.contextmanager
def pytorch_only():
    saved = {n: getattr(decode, n) for n in ("kernel_layers_apply", "gemv_applies", "qgemv_applies")}
    for n in saved:
        setattr(decode, n, lambda *a: False)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(decode, n, f)


def bench(dtype_name: str, batch: int, kernels: bool, repeats: int, steps: int, big: torch.Tensor,
          scheme: str = "none", kv_cache_dtype: str = "auto", prompt: int = PROMPT) -> dict:
    dtype = DTYPES[dtype_name]
    cfg = preset("small")
    model = build_model(cfg, seed=0, dtype=dtype).eval()
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    if scheme != "none":  # as `moegpt quantize --quantize-embedding` (the table's rows cost the same to look up)
        quantize_model(model, parse_scheme(scheme), embedding=True)
    stored = stored_weight_bytes(model)
    new = (repeats + 2) * steps + 2
    kv_per_token = (kv_cache_bytes_per_token(cfg, dtype.itemsize) if kv_cache_dtype == "auto"
                    else kv_cache_bytes_per_token(cfg, 1, KV_SCALE_BYTES))
    engine, _ = prefilled_engine(model, batch, prompt, new, seed=0, kv_cache_dtype=kv_cache_dtype,
                                 kv_cache_bytes=batch * (prompt + new + 64) * kv_per_token + 2**20)
    reps = []
    weights = weight_bytes(model)  # (outside the timed steps)
    with contextlib.ExitStack() as stack:
        if not kernels:
            stack.enter_context(pytorch_only())
        for _ in range(steps):  # warm-up
            engine.step()
        for _ in range(repeats):
            before = sum_bandwidth(big)
            nbytes, t0 = 0, time.perf_counter()
            for _ in range(steps):
                engine.step()
                nbytes += step_bytes(cfg, weights, engine, dtype.itemsize, kv_per_token)
            t = time.perf_counter() - t0
            after = sum_bandwidth(big)
            bound = (before + after) / 2
            reps.append({"tokens_per_s": batch * steps / t, "read_bytes_per_s": nbytes / t, "sum_before": before,
                         "sum_after": after, "fraction": nbytes / t / bound,
                         "kept": abs(before - after) <= 0.15 * max(before, after)})
    kept = [r for r in reps if r["kept"]] or reps
    fr = [r["fraction"] for r in kept]
    tps = [r["tokens_per_s"] for r in kept]
    return {"dtype": dtype_name, "weights": scheme, "kv_cache": kv_cache_dtype, "prompt": prompt, "batch": batch, "program": "kernels" if kernels else "pytorch",
            "weight_bytes_over_fp32": stored / fp32_bytes, "bytes_per_step_mean": nbytes / steps, "fraction_best": max(fr), "fraction_median": statistics.median(fr),
            "tokens_per_s_median": statistics.median(tps), "sum_gb_s_median": statistics.median(
                [(r["sum_before"] + r["sum_after"]) / 2e9 for r in kept]), "kept": len(kept), "repetitions": reps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch-ops rows")
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], choices=["auto", "int8", "fp8"])
    p.add_argument("--prompt", type=int, default=PROMPT, help=f"prompt tokens of each sequence (default {PROMPT})")
    p.add_argument("--schemes", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"],
                   help="weights as they are (none) or quantized (activations in --dtypes)")
    a = p.parse_args()
    torch.manual_seed(0)
    big = torch.ones(SUM_BYTES // 4)
    rows = []
    programs = (True, False) if not a.no_pytorch else (True,)
    for scheme, kv, name, batch, kernels in itertools.product(a.schemes, a.kv_cache_dtypes, a.dtypes, a.batches,
                                                              programs):
        if scheme != "none" and not kernels:  # quantized weights in PyTorch ops: the kernels' oracle, not a fast path
            continue
        r = bench(name, batch, kernels, a.repeats, a.steps, big, scheme, kv, a.prompt)
        rows.append(r)
        weights = ("" if scheme == "none" else f"{scheme} weights, ") + ("" if kv == "auto" else f"{kv} KV, ")
        print(f"{weights}{name} batch {batch:>2} {r['program']:>7}: {r['tokens_per_s_median']:7.1f} tok/s, "
              f"{r['fraction_median']:.2f} of the paired 1 GiB sum (best {r['fraction_best']:.2f}; "
              f"sum {r['sum_gb_s_median']:.1f} GB/s, {r['bytes_per_step_mean'] / 1e6:.0f} MB/step, "
              f"{r['kept']}/{len(r['repetitions'])} kept; weights {r['weight_bytes_over_fp32']:.3f}x fp32's bytes)",
              flush=True)
    path = write_result("decode_paired", {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
