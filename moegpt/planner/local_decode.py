"""``--measure-efficiency``: how fast our engine decodes one model here, at one batch and context, measured.

The decode roofline divides the bytes a step reads by the read bandwidth of a 1 GiB sum. Our
engine's step takes longer, for two reasons this file measures apart:

- t_matmul: the step's weight matrix products at the model's own shapes, dtype and layout
  (moegpt.infer.layout), weights cold in memory, each timed as the engine's decode program
  multiplies (moegpt.infer.measure: the C++ matrix-vector kernel at a few rows, torch's matmul
  beyond; the program's MoE runs each touched expert's rows together, which this approximates).
  Small matrices, and products of a few rows, read slower per byte than the one long stream.
- t_software: everything in a step that is not streaming weights: Python, thousands of dispatched
  ops, scheduling, sampling. Measured by running LLMEngine on the same architecture (layers, heads,
  KV heads, experts, top-k, MLP kind, MoE pattern) shrunk to tiny widths, where weights cost nothing.
- t_kv: the KV cache at the read bandwidth. The shrunk model's cache is tiny (head_dim 8), so the
  KV bytes are counted here, once.

    hbm_efficiency = t_roofline_mem / (t_matmul + t_kv)
    stage time     = max(t_mem, t_compute) + t_comm + t_software

where t_roofline_mem is the planner's own memory time at efficiency 1: planning with it makes the
memory time the measured reads, and the software time, which does not scale with the bytes read, is
added to the stage time on its own. Nothing is cached (the figure depends on model and batch), nothing is
printed, and the measuring functions are arguments (``DecodeMeasurers``): moegpt.infer.measure's
time the engine, tests pass fakes.

Legend: B batch (rows per step), C context, L layers, D d_model, F d_ff, E experts, k top-k,
E_t experts touched per MoE layer, r rows per touched expert, O out features, I in features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from moegpt.config import MLPKind, ModelConfig
from moegpt.counts import param_counts
from moegpt.planner.decode import decode, experts_read_fraction
from moegpt.planner.inputs import MeasuredEfficiency, PlanInputs

MAX_MEASURED_CONTEXT = 2048  # beyond: extrapolated (a prefill of C tokens costs ~C^2)
DTYPE_NAMES = {4: "float32", 2: "bfloat16"}  # weight bytes -> the torch dtype the engine would hold
# the shrunk model: widths at which its weights and KV cache are a few MB at most
SHRUNK = dict(d_model=64, head_dim=8, d_ff=16, vocab_size=256)


@dataclass(frozen=True)
class Matmul:
    """One weight matrix product of a decode step, x (rows, I) times W.T with W (O, I), made
    ``count`` times per step over all layers."""

    name: str
    rows: int
    out_features: int
    in_features: int
    count: float  # fractional for experts: E_t touched per layer, on average
    in_by_out: bool  # the engine may store W (in, out) (layout.py); not a tied head (the embedding table)

    @property
    def shape(self) -> tuple[int, int, int, bool]:
        return (self.rows, self.out_features, self.in_features, self.in_by_out)


@dataclass(frozen=True, kw_only=True)
class DecodeMeasurers:
    """The measuring functions: moegpt.infer.measure's, which time our engine (the CLI passes them, so
    the planner never imports the engine); fakes in tests."""

    matmul_s: Callable[[Matmul, int], float]  # (product, weight bytes) -> seconds per product, weights cold
    step_s: Callable[[ModelConfig, int, int, int], float]  # (config, B, C, weight bytes) -> s per engine step


# ---- pure arithmetic ---------------------------------------------------------------------------


def experts_touched(batch: int, k: int, E: int) -> float:
    """E_t = E * (1 - (1 - k/E)^B): experts that B tokens, each routed uniformly to k, touch."""
    return E * experts_read_fraction(batch, k, E)


def rows_per_expert(batch: int, k: int, touched: float) -> int:
    """r = round(B*k / E_t), at least 1: the rows each touched expert multiplies."""
    return max(1, round(batch * k / touched))


def decode_matmuls(cfg: ModelConfig, batch: int) -> tuple[Matmul, ...]:
    """The weight matrix products of one decode step of B sequences, as the model makes them."""
    B, D, F, L = batch, cfg.d_model, cfg.d_ff, cfg.n_layers
    n_moe = cfg.n_moe_layers
    names = ("gate", "up", "down") if cfg.mlp == MLPKind.SWIGLU else ("up", "down")

    def mlp(prefix: str, rows: int, count: float) -> list[Matmul]:
        # up and gate: (F, D); down: (D, F)
        return [Matmul(f"{prefix} {n}", rows, D if n == "down" else F, F if n == "down" else D, count, True)
                for n in names]

    out = [Matmul("wq", B, cfg.q_dim, D, L, True), Matmul("wk", B, cfg.kv_dim, D, L, True),
           Matmul("wv", B, cfg.kv_dim, D, L, True), Matmul("wo", B, D, cfg.q_dim, L, True)]
    if n_moe:
        touched = experts_touched(B, cfg.top_k, cfg.n_experts)
        out.append(Matmul("router", B, cfg.n_experts, D, n_moe, True))
        out += mlp("expert", rows_per_expert(B, cfg.top_k, touched), n_moe * touched)
    if L > n_moe:
        out += mlp("dense", B, L - n_moe)
    # the head runs on the B sampled rows only (runner.py)
    out.append(Matmul("lm head", B, cfg.vocab_size, D, 1, not cfg.tie_embeddings))
    return tuple(out)


def step_matmul_s(products: tuple[Matmul, ...], seconds: Callable[[Matmul], float]) -> float:
    """t_matmul = sum of count x seconds per product; each distinct shape is timed once."""
    timed: dict[tuple, float] = {}
    total = 0.0
    for p in products:
        if p.shape not in timed:
            timed[p.shape] = seconds(p)
        total += p.count * timed[p.shape]
    return total


def shrunk(cfg: ModelConfig) -> ModelConfig:
    """The same architecture (layers, heads, KV heads, experts, top-k, MLP kind, MoE pattern,
    capacity) at tiny widths: the same ops per step, on weights and a KV cache of a few MB."""
    return cfg.replace(**SHRUNK)


def software_step_s(step_s: Callable[[int], float], context: int, cap: int = MAX_MEASURED_CONTEXT) -> float:
    """Seconds per step at ``context``: measured there up to ``cap``; beyond, extrapolated linearly
    from cap/2 and cap (a step gathers every sequence's keys, so its cost grows linearly with C)."""
    if context <= cap:
        return step_s(context)
    lo, hi = step_s(cap // 2), step_s(cap)
    return hi + (context - cap) * max(hi - lo, 0.0) / (cap - cap // 2)


def check_measurable(hardware: str, mode: str, pp: int, ep: int) -> None:
    """One-line errors for what ``--measure-efficiency`` cannot measure: another machine, training,
    a model split over devices."""
    if hardware != "local":
        raise ValueError(f"--measure-efficiency measures this machine: --hardware {hardware!r} is not 'local'")
    if mode != "inference":
        raise ValueError(f"--measure-efficiency measures decoding: --mode {mode!r} is not 'inference'")
    for flag, value in (("--pp", pp), ("--ep", ep)):
        if value != 1:
            raise ValueError(f"--measure-efficiency measures one device holding the whole model: {flag} {value}")


def with_measured_efficiency(inp: PlanInputs, m: MeasuredEfficiency) -> PlanInputs:
    """The inputs planned with the measured hbm_efficiency (the plan's notes show where it came from)."""
    return replace(inp, efficiency=replace(inp.efficiency, hbm_efficiency=m.hbm_efficiency),
                   options=replace(inp.options, measured_efficiency=m))


# ---- measuring -----------------------------------------------------------------------------------


def measure_decode_efficiency(inp: PlanInputs, measurers: DecodeMeasurers) -> MeasuredEfficiency:
    """eta's parts for ``inp``'s model, weight precision, batch and context, measured on this machine
    by ``measurers`` (moegpt.infer.measure's engine measurers, which the CLI passes; fakes in tests)."""
    check_measurable(inp.hardware.name, inp.mode, inp.layout.pp, inp.layout.ep)
    cfg, B, C, wb = inp.model, inp.workload.batch, inp.workload.context, inp.precision.weight_bytes
    if wb not in DTYPE_NAMES:
        raise ValueError(f"--measure-efficiency: --weight-bytes {wb} is not one of {sorted(DTYPE_NAMES)} (the engine "
                         "is timed in fp32 or bf16; for quantized weights plan with --no-measure-efficiency)")
    products = decode_matmuls(cfg, B)
    biggest = max(products, key=lambda p: p.out_features * p.in_features)
    need = 4 * biggest.out_features * biggest.in_features * wb  # 2 copies, each laid out a second time
    if need > inp.hardware.mem_bytes:
        raise ValueError(f"--measure-efficiency: timing the {biggest.name} matrix ({biggest.out_features} x "
                         f"{biggest.in_features}) needs {need / 1e9:.1f} GB, more than this machine's "
                         f"{inp.hardware.mem_bytes / 1e9:.1f} GB")
    at_one = replace(inp, efficiency=replace(inp.efficiency, hbm_efficiency=1.0))
    _, _, dec, reads = decode(at_one, param_counts(cfg))
    m = measurers
    small = shrunk(cfg)
    return MeasuredEfficiency(
        t_roofline_mem_s=dec.t_mem_s,
        t_matmul_s=step_matmul_s(products, lambda p: m.matmul_s(p, wb)),
        t_kv_s=reads.kv_bytes / inp.hardware.hbm_bytes_per_s,
        t_software_s=software_step_s(lambda c: m.step_s(small, B, c, wb), C),
    )
