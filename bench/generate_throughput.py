"""Decode throughput: moegpt's KV-cache generate vs transformers' generate, greedy, same weights.

Batch 1, a 32-token prompt, 64 new tokens, fp32 on this machine's CPU; median of repeats.
Also checks that both produce the same tokens (they must: same weights, greedy).

    python bench/generate_throughput.py [--presets tiny small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from bench.common import interleaved_medians, write_result
from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.infer.generate import generate
from moegpt.model import build_model

PROMPT, NEW = 32, 64


@torch.no_grad()
def bench_preset(name: str, repeats: int) -> dict:
    cfg = preset(name)
    ours = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        save(ours, None, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()

    def run_ours():
        return generate(ours, prompt, NEW)

    def run_hf():
        return hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)

    same = run_ours().tolist() == run_hf().tolist()
    t_ours, t_hf = interleaved_medians([run_ours, run_hf], repeats)
    row = {"preset": name, "batch": 1, "prompt": PROMPT, "new_tokens": NEW,
           "ours_tokens_per_s": NEW / t_ours, "hf_tokens_per_s": NEW / t_hf, "speedup_vs_hf": t_hf / t_ours,
           "same_tokens": same}
    print(f"{name:>6}  moegpt {row['ours_tokens_per_s']:7.1f} tok/s   transformers {row['hf_tokens_per_s']:7.1f} tok/s   "
          f"ratio {row['speedup_vs_hf']:.2f}x   identical greedy tokens: {same}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"greedy decode, batch 1, prompt {PROMPT}, {NEW} new tokens, fp32 CPU")
    rows = [bench_preset(p, args.repeats) for p in args.presets]
    print("wrote", write_result("generate_throughput", {"rows": rows}))


if __name__ == "__main__":
    main()
