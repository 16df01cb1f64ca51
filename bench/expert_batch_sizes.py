"""Per-expert batch sizes while decoding: how many tokens each expert gets per step and layer at
batch 1, 8 and 64 (``small``, random weights, fp32), against the uniform-routing expectation.

The article's worry: top-2 of 16 at batch 8 gives an expert about 1 token, so every expert read
serves few tokens. Each decode step's ``engine.stats.last_expert_counts`` is (Lm, E) tokens per
expert per MoE layer; we pool all steps and layers. Expected experts touched per layer at batch B
under uniform routing: E * (1 - (1 - k/E)^B) (the planner's formula); the mean batch of a touched
expert is then B*k / that.

    python -m bench.expert_batch_sizes [--batches 1 8 64] [--new 16]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import prefilled_engine, write_result
from moegpt.config import preset
from moegpt.model import build_model
from moegpt.planner.decode import experts_read_fraction

DEFAULT_PRESET, PROMPT = "small", 32


@torch.no_grad()
def per_expert_counts(model, batch: int, new: int, seed: int = 0) -> torch.Tensor:
    """(steps, Lm, E) tokens per expert of every decode step (all ``batch`` sequences decoding)."""
    engine, _ = prefilled_engine(model, batch, PROMPT, new, seed, kv_cache_bytes=128 * 2**20)
    steps = []
    while engine.has_work:
        engine.step()
        if engine.stats.running == batch or not engine.has_work:
            steps.append(engine.stats.last_expert_counts.clone())
    return torch.stack(steps)


def describe(counts: torch.Tensor, batch: int, k: int, E: int) -> dict:
    flat = counts.reshape(-1, E)  # (steps * Lm, E)
    touched = (flat > 0).sum(-1).float()  # (steps * Lm,) experts with tokens, per step and layer
    nonzero = flat[flat > 0].float()
    hist = torch.bincount(flat.reshape(-1), minlength=1)
    return {"batch": batch, "steps": counts.shape[0], "tokens_per_layer": batch * k,
            "experts_touched_mean": touched.mean().item(),
            "experts_touched_expected": E * experts_read_fraction(batch, k, E),
            "tokens_per_touched_expert_mean": nonzero.mean().item(),
            "tokens_per_touched_expert_expected": batch * k / (E * experts_read_fraction(batch, k, E)),
            "tokens_per_expert_max": int(flat.max()),
            "tokens_per_touched_expert_p50": nonzero.median().item(),
            "histogram": {int(i): int(c) for i, c in enumerate(hist.tolist()) if c}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="a smaller one (tiny) for a quick smoke run")
    args = parser.parse_args()
    cfg = preset(args.preset)
    model = build_model(cfg, seed=0).eval()
    k, E = cfg.top_k, cfg.n_experts
    print(f"per-expert batch sizes while decoding: {args.preset} (top-{k} of {E}, {cfg.n_moe_layers} MoE layers), "
          f"random weights, prompt {PROMPT}, {args.new} new tokens; pooled over decode steps and layers")
    print(f"{'batch':>5} {'experts touched':>16} {'(uniform)':>9} {'tokens/touched expert':>22} {'(uniform)':>9} "
          f"{'max':>4}  histogram tokens:count")
    rows = []
    for b in args.batches:
        row = describe(per_expert_counts(model, b, args.new), b, k, E)
        rows.append(row)
        hist = " ".join(f"{t}:{c}" for t, c in list(row["histogram"].items())[:12])
        print(f"{b:>5} {row['experts_touched_mean']:>16.2f} {row['experts_touched_expected']:>9.2f} "
              f"{row['tokens_per_touched_expert_mean']:>22.2f} {row['tokens_per_touched_expert_expected']:>9.2f} "
              f"{row['tokens_per_expert_max']:>4}  {hist}")
    print("wrote", write_result("expert_batch_sizes", {"preset": args.preset, "prompt": PROMPT, "new_tokens": args.new,
                                                       "rows": rows}))


if __name__ == "__main__":
    main()
