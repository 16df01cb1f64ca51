"""Training at an extended context: time per step and memory at C and 4C, with and without
activation checkpointing, and transformers' gradient checkpointing on the same shape as the peer.

The `tiny` shape, the same 4,096 tokens per step at every length (B x T: 32 x 128, 8 x 512),
fp32, one optimizer step = forward + backward + AdamW. Memory: the bytes autograd keeps between
forward and backward (train/activations.py SavedActivations, per step) and the process's peak
resident memory over the step (VmHWM, reset before it). transformers' Mixtral with
``gradient_checkpointing_enable()`` on the same weights is measured the same way.

    python -m bench.context_memory [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from bench.train_throughput import hf_model_like
from moegpt.config import RopeScaling, preset
from moegpt.model import build_model
from moegpt.train.activations import SavedActivations, checkpoint_layers, peak_rss_mib, reset_peak_rss
from moegpt.train.step import LossWeights, train_step

TOKENS = 4096
C = 128


def measure(step, model, repeats: int) -> dict:
    step()  # warm-up
    times, kept, peaks = [], [], []
    for _ in range(repeats):
        reset_peak_rss()
        with SavedActivations(model) as saved:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        kept.append(saved.bytes / 2**20)
        peaks.append(peak_rss_mib())
    return {"s_per_step": statistics.median(times), "activation_mib": statistics.median(kept),
            "peak_rss_mib": statistics.median(peaks)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for T in (C, 4 * C):
        B = TOKENS // T
        scaling = None if T == C else RopeScaling(type="yarn", factor=T / C, original_max_seq_len=C)
        cfg = preset("tiny").replace(max_seq_len=T, rope_scaling=scaling)
        batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        for ac in (False, True):
            model = build_model(cfg, seed=0).train()
            if ac:
                checkpoint_layers(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            row = {"seq_len": T, "batch": B, "who": "moegpt", "activation_checkpointing": ac,
                   **measure(lambda: train_step(model, opt, batch, B, LossWeights(aux=0.01, z=1e-3), 1.0), model,
                             args.repeats)}
            rows.append(row)
            print(f"T={T:4d} B={B:2d} moegpt       AC={'on ' if ac else 'off'}  {row['s_per_step'] * 1e3:7.0f} ms/step  "
                  f"kept {row['activation_mib']:7.1f} MiB  peak RSS {row['peak_rss_mib']:7.0f} MiB", flush=True)
            if T == 4 * C:
                hf = hf_model_like(build_model(cfg.replace(rope_scaling=None), seed=0))
                if ac:
                    hf.gradient_checkpointing_enable()
                hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

                def hf_step():
                    hf_opt.zero_grad(set_to_none=True)
                    out = hf(batch[:, :-1])
                    loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten()) + 0.01 * out.aux_loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
                    hf_opt.step()

                row = {"seq_len": T, "batch": B, "who": "transformers", "activation_checkpointing": ac,
                       **measure(hf_step, hf, args.repeats)}
                rows.append(row)
                print(f"T={T:4d} B={B:2d} transformers AC={'on ' if ac else 'off'}  {row['s_per_step'] * 1e3:7.0f} ms/step  "
                      f"kept {row['activation_mib']:7.1f} MiB  peak RSS {row['peak_rss_mib']:7.0f} MiB", flush=True)
    path = write_result("context_memory", {"tokens_per_step": TOKENS, "original_context": C, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
