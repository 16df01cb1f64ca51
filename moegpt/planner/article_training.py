"""The article's claims on the model, the data and training, each checked by the planner.

Every "ours" value is computed from a preset's shape and the article's stated set-up
(moegpt.planner.scenarios); the article's derived figures appear only in ``Claimed``.
"""

from __future__ import annotations

from typing import Callable

from moegpt.planner import scenarios as S
from moegpt.planner.claims import Check, Claimed, Finding
from moegpt.planner.plan import BUBBLE_WARNING, Plan
from moegpt.planner.table import duration, si


def describe(p: Plan) -> str:
    """The shape behind a plan, for the assumptions column."""
    m = p.model
    mlp = "SwiGLU" if m.gated_mlp else "GELU"
    return (f"{p.inputs.preset} preset: {m.n_layers} layers, d {m.d_model:,}, {m.n_heads} heads, {m.n_kv_heads} KV "
            f"head(s), {m.n_experts} {mlp} experts (d_ff {m.d_ff:,}), top-{m.top_k}, vocab {m.vocab_size:,}")


TRAIN_SETUP = "25,000 A100-40GB, TP8 x PP15 (dp 208.3), 13T tokens, 60M-token batches of 8k, ZeRO-1"


def unit_slip(claimed: float, ours: float, unit: str) -> str | None:
    """A claim off by exactly 10^3 or 10^6 from the computed value: a prefix slip."""
    for factor, words in ((1e3, "10^3"), (1e6, "10^6"), (1e-3, "10^-3")):
        if abs(claimed / (ours * factor) - 1) < 0.1:
            return f"unit slip: the figure is {words} x ours; {si(claimed / factor, unit)} is what the arithmetic gives"
    return None


def sci(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _gpt4():
    return S.run(preset="gpt4")


def params(field: str, note: str = "") -> Callable[[Claimed], Finding]:
    """A check of one ``params`` field of the gpt4 preset."""
    def compute(claimed: Claimed) -> Finding:
        p = _gpt4()
        v = getattr(p.params, field)
        return Finding(si(v), describe(p), value=v, note=note)
    return compute


def flops_moe(claimed: Claimed) -> Finding:
    p = _gpt4()
    v = p.flops.forward_per_token
    return Finding(si(v, "FLOP"), "2 FLOPs per active parameter (" + si(p.params.active_per_token) + ")", value=v,
                   inconsistency=unit_slip(claimed.value, v, "FLOP"))


def flops_dense(claimed: Claimed) -> Finding:
    p = _gpt4()
    v = p.flops.forward_per_token_dense
    return Finding(si(v, "FLOP"), "2 FLOPs per parameter of all " + si(p.params.total), value=v,
                   inconsistency=unit_slip(claimed.value, v, "FLOP"))


def flops_ratio(claimed: Claimed) -> Finding:
    p = _gpt4()
    v = p.flops.forward_per_token / p.flops.forward_per_token_dense
    return Finding(f"{v:.3f}", "2*active / 2*total of the gpt4 preset", value=v)


def params_vs_gpt3(claimed: Claimed) -> Finding:
    p = _gpt4()
    v = p.derived.params_ratio_vs_gpt3
    gpt3 = si(p.params.total / v, digits=4)
    return Finding(f"{v:.1f}x", f"gpt4 total / davinci (GPT-3's shape: {gpt3} by counts.py)", value=v)


def unique_tokens(claimed: Claimed) -> Finding:
    D = S.TRAIN_A100["tokens"]
    low, high = D / 4, D / 2  # all code (4 epochs) .. all text (2 epochs)
    refined = claimed.value  # the article's RefinedWeb figure
    share = 4 * refined / D - 1  # text share s with D*(s/2 + (1-s)/4) = 5T
    return Finding(f"{si(low)}-{si(high)} unique", "13T seen = unique text x 2 + unique code x 4",
                   holds=low <= refined <= high, note=f"~5T unique needs {share:.0%} of the 13T to be text")


def chinchilla(claimed: Claimed) -> Finding:
    p = S.run(S.TRAIN_A100)
    v = p.derived.chinchilla_token_multiple
    per_active = p.training.tokens / p.params.active_per_token
    return Finding(f"{v:.2f}x", f"Chinchilla's {p.inputs.options.tokens_per_param:g} tokens per (total) parameter",
                   value=v, note=f"2x matches ~{20 * 2 / v:.0f} tokens/param; per *active* parameter 13T is "
                                 f"already {per_active:.0f} tokens/param, {per_active / 20:.1f}x the optimum")


def chinchilla_tokens(claimed: Claimed) -> Finding:
    v = S.CHINCHILLA_PARAMS * S.run(S.TRAIN_A100).inputs.options.tokens_per_param
    return Finding(si(v), "Chinchilla (70B) at 20 tokens per parameter", value=v)


def batch_per_expert(claimed: Claimed) -> Finding:
    v = S.run(S.TRAIN_A100).moe.tokens_per_expert
    return Finding(si(v), "60M-token batch x top-2 / 16 experts", value=v)


def compute_vs_gpt3(claimed: Claimed) -> Finding:
    d = S.run(S.TRAIN_A100, compare_tokens=S.GPT3_TOKENS).derived
    v = d.train_compute_ratio_vs_gpt3
    gpt3 = S.run(preset="davinci").params.total
    return Finding(f"{v:.0f}x", f"6 x active x 13T vs GPT-3's 6 x {si(gpt3, digits=4)} x {si(S.GPT3_TOKENS)} tokens",
                   value=v,
                   note=f"parameters grew {d.params_ratio_vs_gpt3:.1f}x, compute {v:.0f}x")


def weights_per_gpu(claimed: Claimed) -> Finding:
    p = S.run(S.TRAIN_A100)
    v = p.memory.weights_bytes_per_gpu
    return Finding(si(v, "B"), f"{si(p.params.total)} params x 2 B / (TP8 x PP15)", value=v)


def zero1_fits(claimed: Claimed) -> Finding:
    p = S.run(S.TRAIN_A100)
    z2 = S.run(S.TRAIN_A100, zero_stage=2).memory
    m = p.memory
    v = m.training_state_bytes_per_gpu
    bad = None if v <= p.inputs.hardware.mem_bytes else (
        f"ZeRO-1 shards only Adam's state: {si(m.weights_bytes_per_gpu, 'B')} of weights + "
        f"{si(m.grads_bytes_per_gpu, 'B')} of BF16 gradients already exceed 40 GB; ZeRO-2 gives "
        f"{si(z2.training_state_bytes_per_gpu, 'B')}")
    return Finding(si(v, "B"), TRAIN_SETUP + "; full recomputation, sequence-parallel activations", value=v,
                   inconsistency=bad)


def bubble(claimed: Claimed) -> Finding:
    t = S.run(S.TRAIN_A100).training
    return Finding(f"{t.pipeline_bubble_fraction:.0%} idle", f"1F1B, {t.microbatches_per_replica} micro-batches of "
                   f"one 8k sequence per replica; 'high' = over {BUBBLE_WARNING:.0%}",
                   holds=t.pipeline_bubble_fraction > BUBBLE_WARNING)


def train_flops(claimed: Claimed) -> Finding:
    p = S.run(S.TRAIN_A100)
    t = p.training
    return Finding(sci(t.total_flops), f"6 x {si(p.params.active_per_token)} active x 13T tokens", value=t.total_flops,
                   note=f"{sci(t.total_flops_with_attention)} with causal attention scores at 8k")


def a100_days(claimed: Claimed) -> Finding:
    lo, hi = (S.run(S.TRAIN_A100, mfu=m).training.days for m in S.TRAIN_MFU_RANGE)
    t = S.run(S.TRAIN_A100, mfu=sum(S.TRAIN_MFU_RANGE) / 2).training
    mid = t.days
    return Finding(f"{mid:.1f} days", f"our {sci(t.total_flops)} FLOPs at 34% MFU of A100 BF16 (32%: {lo:.0f} d, "
                   f"36%: {hi:.0f} d)",
                   value=mid)


def a100_mfu(claimed: Claimed) -> Finding:
    mfus = [S.run(S.TRAIN_A100, days=d).training.mfu for d in S.TRAIN_DAYS_RANGE]
    mid = S.run(S.TRAIN_A100, days=sum(S.TRAIN_DAYS_RANGE) / 2).training.mfu
    return Finding(f"{mid:.1%}", f"our FLOPs in 95 days (90 d: {mfus[0]:.1%}, 100 d: {mfus[1]:.1%})", value=mid)


def a100_cost(claimed: Claimed) -> Finding:
    t = S.run(S.TRAIN_A100, mfu=sum(S.TRAIN_MFU_RANGE) / 2).training
    days_claimed = claimed.value / (S.TRAIN_A100["gpus"] * 24 * S.TRAIN_A100["gpu_hour_usd"])
    return Finding("$" + si(t.cost_usd), f"{t.days:.0f} days (34% MFU) x 25,000 GPUs x $1/h", value=t.cost_usd,
                   note=f"{claimed.text} is {days_claimed:.0f} days of 25,000 GPUs")


def h100_cost(claimed: Claimed) -> Finding:
    t = S.run(S.TRAIN_H100, days=S.H100_DAYS).training
    return Finding("$" + si(t.cost_usd), "8,192 H100 x 55 days x $2/h", value=t.cost_usd,
                   note=f"55 days for our FLOPs means {t.mfu:.0%} MFU at the BF16 peak")


def h100_days(claimed: Claimed) -> Finding:
    t = S.run(S.TRAIN_H100, mfu=sum(S.TRAIN_MFU_RANGE) / 2).training
    fp8 = S.run(S.TRAIN_H100, mfu=sum(S.TRAIN_MFU_RANGE) / 2, weight_bytes=1).training
    return Finding(f"{t.days:.0f} days", f"our {sci(t.total_flops)} FLOPs on 8,192 H100 at the A100 run's 34% MFU "
                   "(BF16 peak)",
                   value=t.days, note=f"at the FP8 peak: {fp8.days:.0f} days; 55 days needs "
                                      f"{S.run(S.TRAIN_H100, days=S.H100_DAYS).training.mfu:.0%} BF16 MFU")


def allreduce(claimed: Claimed) -> Finding:
    # article: islands are non-blocking at 800G/1.6T per node, but linked at only 200G/400G; a
    # node's 8 GPUs hold different TP shards, so all of their gradients cross those links
    gbps = [node / 8 for node in S.ISLAND_LINK_GBPS_PER_NODE]
    plans = [S.run(S.TRAIN_A100, mfu=0.34, nic_gbps_per_gpu=g) for g in gbps]
    dgx = S.run(S.TRAIN_A100, mfu=0.34, nic_gbps_per_gpu=S.DGX_A100_GBPS_PER_GPU).training
    slow, fast = (p.training for p in plans)
    step = slow.step_time_s
    share = [t.dp_allreduce_s / step for t in (fast, slow)]
    return Finding(f"{duration(fast.dp_allreduce_s)}-{duration(slow.dp_allreduce_s)} of a {duration(step)} step "
                   f"({share[0]:.0%}-{share[1]:.0%})",
                   f"ring all-reduce over dp of each GPU's {si(plans[0].memory.grads_bytes_per_gpu, 'B')} of BF16 "
                   f"gradients across the 200G/400G island links, shared by a node's 8 GPUs "
                   f"({gbps[0]:g}-{gbps[1]:g} Gb/s each), no overlap; 'costly' = over {BUBBLE_WARNING:.0%} of a "
                   "step at 34% MFU",
                   holds=min(share) > BUBBLE_WARNING,
                   note=f"inside an island (a DGX's {S.DGX_A100_GBPS_PER_GPU:g} Gb/s per GPU) it would be "
                        f"{duration(dgx.dp_allreduce_s)} ({dgx.dp_allreduce_s / step:.0%}); overlap with the "
                        "backward pass hides part of it")


T_MODEL, T_DATA, T_TRAIN = "Model", "Data", "Training: parallelism, time and cost"

CHECKS: list[Check] = [
    Check("M1", T_MODEL, "GPT-4 has about 1.8T parameters in 120 layers", Claimed("~1.8T", 1.8e12), params("total")),
    Check("M2", T_MODEL, "GPT-4 is more than 10x GPT-3 (175B)", Claimed(">10x", 10, bound=">"), params_vs_gpt3),
    Check("M3", T_MODEL, "each of the 16 experts has about 111B MLP parameters", Claimed("~111B", 111e9),
          params("per_expert_mlp")),
    Check("M4", T_MODEL, "about 55B shared parameters for attention", Claimed("~55B", 55e9), params("attention")),
    Check("M5", T_MODEL, "a forward pass uses only about 280B parameters (top-2 of 16)", Claimed("~280B", 280e9),
          params("active_per_token")),
    Check("M6", T_MODEL, "... and about 560 TFLOP per token", Claimed("560 TFLOP", 560e12), flops_moe),
    Check("M7", T_MODEL, "a dense 1.8T model would need about 3,700 TFLOP per token", Claimed("3,700 TFLOP", 3700e12),
          flops_dense),
    Check("M8", T_MODEL, "MoE forward FLOPs as a fraction of the dense model's (560 / 3,700)",
          Claimed("0.151", 560 / 3700), flops_ratio),
    Check("D1", T_DATA, "13T tokens are not unique: text 2 epochs, code 4; consistent with RefinedWeb's ~5T",
          Claimed("~5T unique", 5e12), unique_tokens),
    Check("D2", T_DATA, "Chinchilla-optimal training would need about 2x the tokens", Claimed("2x", 2.0), chinchilla),
    Check("D3", T_DATA, "Chinchilla was trained on about 1.4T tokens", Claimed("~1.4T", 1.4e12), chinchilla_tokens),
    Check("D4", T_DATA, "batch ramped to 60M tokens: 'only' 7.5M tokens per expert", Claimed("7.5M", 7.5e6),
          batch_per_expert),
    Check("D5", T_DATA, "OpenAI wanted to scale 100x from GPT-3 to GPT-4 (compute)", Claimed("100x", 100),
          compute_vs_gpt3),
    Check("T1", T_TRAIN, "~30 GB of FP16 parameters per GPU with TP8 x PP15", Claimed("~30 GB", 30e9),
          weights_per_gpu),
    Check("T2", T_TRAIN, "that fits 40 GB A100s with ZeRO stage 1", Claimed("< 40 GB", 40e9, bound="<"), zero1_fits),
    Check("T3", T_TRAIN, "15-way PP is too much pipelining (a large per-batch bubble, absorbed)",
          Claimed("high bubble"), bubble),
    Check("T4", T_TRAIN, "training compute about 2.15e25 FLOPs", Claimed("2.15e25", 2.15e25), train_flops),
    Check("T5", T_TRAIN, "25,000 A100s for 90-100 days ... at 32-36% MFU: days", Claimed("90-100 days", 95, 90, 100),
          a100_days),
    Check("T6", T_TRAIN, "... the same: MFU for 90-100 days", Claimed("32-36%", 0.34, 0.32, 0.36), a100_mfu),
    Check("T7", T_TRAIN, "at ~$1 per A100-hour the run costs about $63M", Claimed("~$63M", 63e6), a100_cost),
    Check("T8", T_TRAIN, "8,192 H100s for ~55 days at $2/h: about $21.5M", Claimed("~$21.5M", 21.5e6), h100_cost),
    Check("T9", T_TRAIN, "... i.e. 8,192 H100s do the run in ~55 days", Claimed("~55 days", 55), h100_days),
    Check("T10", T_TRAIN, "all-reduce over so many GPUs (200G/400G between islands) is very costly",
          Claimed("costly"), allreduce),
]
