"""Training throughput: moegpt vs HF transformers' MixtralForCausalLM on the same shape, same batch.

One optimizer step = forward + backward + fused AdamW (the same optimizer for both) over B x T tokens,
fp32 on this machine's CPU.
Reports median tokens/s over repeats, MFU against the measured fp32 matmul peak, and the ratio.

    python bench/train_throughput.py [--presets tiny small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import torch
import torch.nn.functional as F
import transformers

from bench.common import interleaved_medians, write_result
from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.counts import train_flops_per_token
from moegpt.model import build_model
from moegpt.hardware import measure_matmul_flops
from moegpt.train.step import LossWeights, train_step

SHAPES = {"tiny": (16, 128), "small": (4, 128)}  # (batch, seq_len) per step


def hf_model_like(ours):
    """The same weights in transformers, through a model directory (its own loader converts them)."""
    with tempfile.TemporaryDirectory() as d:
        save(ours, None, d)
        # output_router_logits: HF then computes its load-balancing loss too, as we do.
        return transformers.AutoModelForCausalLM.from_pretrained(d, output_router_logits=True).train()


def bench_preset(name: str, repeats: int, peak: float) -> dict:
    cfg = preset(name)
    B, T = SHAPES[name]
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    flops = train_flops_per_token(cfg, T)

    ours = build_model(cfg, seed=0).train()
    hf = hf_model_like(ours)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    weights = LossWeights(aux=0.01, z=1e-3)

    def ours_step():
        train_step(ours, opt_ours, batch, B, weights, 1.0)

    def hf_step():
        opt_hf.zero_grad(set_to_none=True)
        out = hf(batch[:, :-1])
        logits = out.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = loss + 0.01 * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()

    # Interleaved, so that drift in the machine's speed hits both alike.
    t_ours, t_hf = interleaved_medians([ours_step, hf_step], repeats)
    del ours, hf, opt_ours, opt_hf
    gc.collect()
    tok = B * T
    row = {
        "preset": name, "batch": B, "seq_len": T,
        "ours_tokens_per_s": tok / t_ours, "hf_tokens_per_s": tok / t_hf,
        "ours_mfu": tok / t_ours * flops / peak, "hf_mfu": tok / t_hf * flops / peak,
        "speedup_vs_hf": t_hf / t_ours,
    }
    print(f"{name:>6}  B={B} T={T}  moegpt {row['ours_tokens_per_s']:8.0f} tok/s (MFU {row['ours_mfu']:6.1%})   "
          f"transformers {row['hf_tokens_per_s']:8.0f} tok/s (MFU {row['hf_mfu']:6.1%})   ratio {row['speedup_vs_hf']:.2f}x")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    peak = measure_matmul_flops(torch.float32)
    print(f"training step throughput, fp32 CPU; matmul peak {peak / 1e9:.0f} GFLOP/s (measured)")
    rows = [bench_preset(p, args.repeats, peak) for p in args.presets]
    print("wrote", write_result("train_throughput", {"peak_flops_fp32": peak, "rows": rows}))


if __name__ == "__main__":
    main()
