"""The rooflines the inference benchmarks compare against, from the planner's formulas and this
machine's bandwidth and matmul peak measured in the same run.

Decode step of B sequences at context C (weights w bytes each, KV kv bytes each):
  bytes = [shared - embedding rows not looked up + f * experts] * w + B * C * KV bytes per token,
  f = 1 - (1 - k/E)^B (the expected fraction of experts B tokens touch; 2/16 at B = 1),
  t = max(bytes / read bandwidth, B * FLOPs per token at C / fp32 matmul peak).
Prefill of T tokens: t = T * FLOPs per token at T/2 / fp32 matmul peak.
Legend: B batch, C context, T prompt tokens, E experts, k top-k, V vocab, D d_model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moegpt.config import ModelConfig
from moegpt.counts import forward_flops_per_token, param_counts
from moegpt.planner.decode import embedding_rows_not_read, experts_read_fraction
from moegpt.hardware import measure_matmul_flops, measure_read_bandwidth


@dataclass(frozen=True)
class Machine:
    read_bytes_per_s: float  # best of a sum over a 1 GiB array (moegpt.hardware.measure_read_bandwidth)
    fp32_flops: float  # best of a square fp32 matmul

    def to_dict(self) -> dict:
        return asdict(self)


def measure_machine(repeats: int = 8) -> Machine:
    return Machine(measure_read_bandwidth(repeats=repeats, budget_s=4.0), measure_matmul_flops(repeats=repeats))


def best_of(*machines: Machine) -> Machine:
    """The best figures of several measurements (a benchmark measures before and after its timings:
    on a shared machine one moment's figures can be far below what the hardware does)."""
    return Machine(max(m.read_bytes_per_s for m in machines), max(m.fp32_flops for m in machines))


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float, weight_bytes: int, kv_bytes: int) -> dict:
    """Bytes one decode step of ``batch`` sequences reads: weights actually touched, plus KV."""
    c = param_counts(cfg)
    f = experts_read_fraction(batch, cfg.top_k, cfg.n_experts)
    weights = (c.shared - embedding_rows_not_read(cfg, batch) + f * c.experts_total) * weight_bytes
    kv = batch * context * 2 * cfg.n_layers * cfg.kv_dim * kv_bytes
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_read_fraction": f}


def decode_roofline(cfg: ModelConfig, m: Machine, batch: int, context: float, weight_bytes: int) -> dict:
    """Tokens/s bound of decoding ``batch`` sequences at ``context``: the slower of memory and compute."""
    b = decode_bytes_per_step(cfg, batch, context, weight_bytes, weight_bytes)
    t_mem = b["total"] / m.read_bytes_per_s
    t_comp = batch * forward_flops_per_token(cfg, int(context)) / m.fp32_flops
    return {"tokens_per_s": batch / max(t_mem, t_comp), "bytes_per_step": b["total"], "weight_bytes": b["weights"],
            "kv_bytes": b["kv"], "experts_read_fraction": b["experts_read_fraction"], "t_mem_s": t_mem,
            "t_compute_s": t_comp, "bound": "compute" if t_comp > t_mem else "memory"}


def prefill_roofline(cfg: ModelConfig, m: Machine, tokens: int) -> dict:
    """Tokens/s bound of prefilling ``tokens`` at the fp32 matmul peak (mean context tokens/2)."""
    flops = tokens * forward_flops_per_token(cfg, tokens // 2)
    return {"tokens_per_s": m.fp32_flops / (flops / tokens), "flops": flops}
