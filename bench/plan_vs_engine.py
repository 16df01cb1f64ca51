"""Closing the loop: the planner's predicted decode tokens/s on this machine vs LLMEngine's measured.

The ``small`` preset (0.52B total, 0.12B active, fp32) with random weights is saved to a model
directory; the planner reads that directory (fp32 -> 4-byte weights and KV, the fp32 peak) with
hardware ``local`` (this machine, measured once and cached: the read bandwidth of a 1 GiB sum and
the fp32 matmul peak) and ``embedding_lookup`` on, at context = prompt + half the new
tokens. Two predictions per batch:
- roofline: the reference decode algorithm, hbm_efficiency 1;
- measured efficiency: the same plan with the hbm_efficiency that ``moegpt plan --hardware local
  --model DIR`` measures by default (``--measure-efficiency``; moegpt.planner.local_decode: the
  step's weight matmuls at the model's shapes, cold, plus the engine's per-step software time on the
  architecture shrunk to tiny widths). ``within_25pct``
  and the ratio refer to this one.

Measured: greedy LLMEngine decode, a 64-token prompt and 64 new tokens per sequence, batch 1 and 16.
Decode only: the whole batch is prefilled in the first step (max_batched_tokens covers every
prompt); the clock runs over the steps after it, which decode the whole batch, and tokens/s =
tokens those steps produced / their time. Median of ``--repeats`` runs (default 1, after a short
warm-up run: batch 16 alone takes ~1-2 minutes on 2 cores).

    python -m bench.plan_vs_engine [--batches 1 16] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench.common import prefilled_engine, write_result
from moegpt.checkpoint.model_dir import read_config, save
from moegpt.cli import engine_decode_measurers
from moegpt.config import preset
from moegpt.model import build_model
from moegpt.planner.cli import default_cache_dir
from moegpt.planner.inputs import make_inputs, model_dir_bytes
from moegpt.planner.local import local_hardware
from moegpt.planner.local_decode import measure_decode_efficiency, with_measured_efficiency
from moegpt.planner.plan import plan

PRESET, PROMPT, NEW, TOLERANCE = "small", 64, 64, 0.25


def predict(model_dir: str, batch: int) -> dict:
    """The planner's decode predictions for ``model_dir`` at ``batch`` on this machine: the roofline's,
    and the one planned with the measured hbm_efficiency (the path of ``--measure-efficiency``)."""
    width = model_dir_bytes(model_dir)
    hw = local_hardware(default_cache_dir())
    inp = make_inputs(preset=model_dir, model=read_config(model_dir), hardware=hw, batch=batch,
                      context=PROMPT + NEW // 2, weight_bytes=width, kv_bytes=width, embedding_lookup=True)
    m = measure_decode_efficiency(inp, engine_decode_measurers())
    roof, refined = plan(inp), plan(with_measured_efficiency(inp, m))
    return {"tokens_per_s": refined.decode.cluster_tokens_per_s, "t_mem_s": refined.decode.t_mem_s,
            "t_compute_s": refined.decode.t_compute_s, "bound": refined.roofline.bound,
            "hbm_efficiency": m.hbm_efficiency, "eta": m.eta, "t_matmul_s": m.t_matmul_s, "t_kv_s": m.t_kv_s,
            "t_software_s": m.t_software_s,
            "roofline": {"tokens_per_s": roof.decode.cluster_tokens_per_s, "t_mem_s": roof.decode.t_mem_s,
                         "t_compute_s": roof.decode.t_compute_s, "bound": roof.roofline.bound},
            "hbm_bytes_per_s": hw.hbm_bytes_per_s, "peak_flops": hw.peak_for(width)}


@torch.no_grad()
def measure(model, batch: int, seed: int, new: int = NEW) -> float:
    """Decode tokens/s of LLMEngine: the steps after the one that prefills every prompt."""
    engine, first = prefilled_engine(model, batch, PROMPT, new, seed, kv_cache_bytes=64 * 2**20)  # + first tokens
    assert len(first) == batch, f"prefill took more than one step ({len(first)} of {batch})"
    tokens, t0 = 0, time.perf_counter()
    while engine.has_work:
        tokens += sum(len(u.new_token_ids) for u in engine.step())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    model = build_model(preset(PRESET), seed=0).eval()
    print(f"planner (--hardware local) vs LLMEngine decode: {PRESET}, fp32 CPU, prompt {PROMPT}, {NEW} new "
          f"tokens, context {PROMPT + NEW // 2}; decode steps only (prefill step excluded)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        save(model, None, d)
        for batch in args.batches:
            pred = predict(d, batch)
            measure(model, batch, seed=99, new=4)  # warm-up: a few decode steps
            measured = statistics.median(measure(model, batch, seed=r) for r in range(args.repeats))
            ratio = measured / pred["tokens_per_s"]
            roof = pred["roofline"]["tokens_per_s"]
            row = {"preset": PRESET, "batch": batch, "prompt": PROMPT, "new_tokens": NEW,
                   "context": PROMPT + NEW // 2, "predicted_tokens_per_s": pred["tokens_per_s"],
                   "roofline_tokens_per_s": roof, "measured_tokens_per_s": measured,
                   "measured_over_predicted": ratio, "measured_over_roofline": measured / roof,
                   "within_25pct": abs(ratio - 1) <= TOLERANCE, "prediction": pred}
            rows.append(row)
            print(f"batch {batch:>3}  roofline {roof:6.1f} tok/s   measured-efficiency {pred['tokens_per_s']:6.1f} "
                  f"tok/s (hbm_efficiency {pred['hbm_efficiency']:.2f}: matmul {pred['t_matmul_s'] * 1e3:.1f} + "
                  f"KV {pred['t_kv_s'] * 1e3:.1f} + software {pred['t_software_s'] * 1e3:.1f} ms/step)   "
                  f"engine {measured:6.1f} tok/s   ratio {ratio:.2f}   within 25%: {row['within_25pct']}")
    print("wrote", write_result("plan_vs_engine", {"rows": rows}))


if __name__ == "__main__":
    main()
