"""The article's claims on inference: bandwidth, KV cache, MoE batching, serving layout and cost.

Every "ours" value comes from the reference decode algorithm over a preset and the article's
stated set-up (moegpt.planner.scenarios); the article's derived figures appear only in ``Claimed``.
"""

from __future__ import annotations

from moegpt.planner import scenarios as S
from moegpt.planner.claims import Check, Claimed, Finding
from moegpt.planner.plan import Plan
from moegpt.planner.table import si

SERVE = "128 A100-40GB, TP8 x PP16, batch 4,096 at 8k context, BF16, $1/h"
FP16_GB_CLAIM = 30e9  # E5's bound, also used to test E4 against it
CHART = "dense-1t on 8 H100 (TP8), batch 1, overhead = parameter reads (2x, KV reads included)"


def reading(i: int) -> Finding:
    wpm = S.WORDS_PER_MIN[i]
    v = S.run(words_per_min=wpm, tokens_per_word=S.TOKENS_PER_WORD_IMPLIED).derived.reading_speed_tok_s
    english = S.run(words_per_min=wpm).derived.reading_speed_tok_s
    return Finding(f"{v:.2f} tok/s", f"{wpm} words/min x {S.TOKENS_PER_WORD_IMPLIED:g} tokens per word (implied)",
                   value=v, note=f"2 tokens/word is high for English: at ~1.33, {english:.2f} tok/s")


def reader_speed(i: int) -> float:
    """Tokens/s for the article's average (0) or fast (1) reader."""
    p = S.run(words_per_min=S.WORDS_PER_MIN[i], tokens_per_word=S.TOKENS_PER_WORD_IMPLIED)
    return p.derived.reading_speed_tok_s


def fast_reader() -> float:
    return reader_speed(1)


def dense_1t_speed(claimed: Claimed) -> Finding:
    p = S.run(S.CHART_8XH100, target_tps=fast_reader())
    d = p.decode
    have = p.inputs.layout.tp * p.inputs.hardware.hbm_bytes_per_s
    return Finding(f"{d.tokens_per_s_per_user:.1f} tok/s", CHART, value=d.tokens_per_s_per_user,
                   note=f"33.33 tok/s needs {si(d.bandwidth_required_bytes_per_s, 'B/s')} of HBM; 8 H100 have "
                        f"{si(have, 'B/s')}")


def dense_1t_mfu(claimed: Claimed) -> Finding:
    p = S.run(S.CHART_8XH100, target_tps=20)
    v = p.decode.mfu_at_target_tps
    return Finding(f"{v:.2%}", CHART + f"; 2 x {si(p.params.total)} FLOPs x 20 tok/s / 8 x "
                   f"{si(p.inputs.hardware.peak_flops.bf16, 'FLOP/s')}", value=v,
                   note=f"and 20 tok/s is out of reach at batch 1 ({p.decode.tokens_per_s_per_user:.1f} tok/s)")


def ffn_bound(claimed: Claimed) -> Finding:
    v = S.run(S.CHART_8XH100, target_tps=20).decode.max_params_for_target_tps
    fast = S.run(S.CHART_8XH100, target_tps=fast_reader()).decode.max_params_for_target_tps
    old = S.run(S.CHART_8XH100, hardware=S.with_hbm("h100-sxm", S.H100_WHITEPAPER_HBM), target_tps=20)
    return Finding(si(v), "8 H100 (TP8) at 20 tok/s per user, batch 1, overhead 2x", value=v,
                   note=f"at 33.33 tok/s: {si(fast)}; with the older 3,072 GB/s H100 figure: "
                        f"{si(old.decode.max_params_for_target_tps)}")


def intensity(claimed: Claimed) -> Finding:
    p = S.run(preset="dense-1t", hardware="h100-sxm", batch=256)
    r = p.roofline
    per_param = r.arithmetic_intensity_per_param
    bad = None if abs(r.arithmetic_intensity_flop_per_byte_shared / claimed.value - 1) < 0.1 else (
        f"2 FLOPs x 256 tokens = {per_param:.0f} FLOP per *parameter* read; per byte it is "
        f"{r.arithmetic_intensity_flop_per_byte_shared:.0f} at FP16 ({claimed.value:.0f} only with 8-bit weights), "
        "and 'FLOP/s' should be FLOP")
    return Finding(f"{r.arithmetic_intensity_flop_per_byte_shared:.0f} FLOP/B",
                   "batch 256, one weight read, 2-byte weights", value=r.arithmetic_intensity_flop_per_byte_shared,
                   inconsistency=bad)


def ridge(claimed: Claimed) -> Finding:
    h = S.run(preset="dense-1t", hardware="h100-sxm", batch=256).roofline.ridge_flop_per_byte
    lo = S.run(preset="dense-1t", hardware="h100-sxm", batch=256).roofline.arithmetic_intensity_flop_per_byte_shared
    hi = S.run(preset="dense-1t", hardware="h100-sxm", batch=512).roofline.arithmetic_intensity_flop_per_byte_shared
    return Finding(f"H100 ridge {h:.0f} FLOP/B", f"batch 256-512 at FP16: {lo:.0f}-{hi:.0f} FLOP/B",
                   holds=lo <= h <= hi)


def kv_mha(i: int) -> Finding:
    p = S.run(S.KV_MHA)
    m = p.memory
    half = S.run(S.KV_MHA, kv_bytes=1).memory.kv_cache_bytes_total
    assumptions = (f"palm540b-mha ({si(p.params.total)}; {p.model.n_layers} layers, {p.model.n_kv_heads} KV heads x "
                   f"{p.model.head_dim}), batch 512 x 2,048, 2-byte K and V")
    if i == 0:
        return Finding(si(m.kv_cache_bytes_total, "B"), assumptions, value=m.kv_cache_bytes_total,
                       note=f"3 TB matches 1-byte KV ({si(half, 'B')}) or K alone")
    return Finding(f"{m.kv_cache_to_weights_ratio:.1f}x", assumptions + "; weights at 2 B",
                   value=m.kv_cache_to_weights_ratio,
                   note="3 TB = 3x the weights implies 1 TB of weights (500B at 2 B)")


def kv_mqa(claimed: Claimed) -> Finding:
    mha = S.run(S.KV_MHA).memory.kv_cache_bytes_total
    mqa = S.run(S.KV_MHA, overrides={"n_kv_heads": 1}).memory.kv_cache_bytes_total
    return Finding(f"{si(mqa, 'B')} ({mha / mqa:.0f}x smaller)", "same model with one KV head", holds=mha / mqa > 1)


def max_batch(preset: str, context: int, sharding: str = "replicated") -> int:
    p = S.run(S.SERVE_A100, preset=preset, batch=1, context=context, kv_sharding=sharding)
    return p.memory.max_batch_sequences


def mqa_batch(claimed: Claimed) -> Finding:
    mqa, mha = max_batch("gpt4", 8192), max_batch("gpt4-mha", 8192)
    return Finding(f"{mha} sequences (MHA) vs {mqa} (MQA)", "128 A100-40GB, TP8 x PP16, 8k context, replicated KV",
                   holds=mqa > 2 * mha)


def ctx32k(claimed: Claimed) -> Finding:
    rep, shard = max_batch("gpt4", 32768), max_batch("gpt4", 32768, "batch")
    return Finding(f"{rep} sequences fit", "gpt4 (MQA) on 128 A100-40GB, TP8 x PP16, 32k context, replicated KV",
                   holds=rep == 0, note=f"{shard} with KV split by sequence; small batches, but it runs")


def batch_4k_fits(claimed: Claimed) -> Finding:
    """The longest mean context at which 4,096 sequences' KV cache fits beside the weights."""
    p = S.run(S.SERVE_A100, kv_sharding="batch")
    m = p.memory
    free = p.inputs.hardware.mem_bytes - m.weights_bytes_per_gpu
    ctx = free / (p.inputs.workload.batch * m.kv_cache_bytes_per_token_per_gpu)
    return Finding(f"{ctx:,.0f} tokens", SERVE + f"; KV split by sequence (its best case): {si(free, 'B')} per GPU "
                   f"left beside {si(m.weights_bytes_per_gpu, 'B')} of weights", value=ctx,
                   note=f"4,096 full 8k sequences need {si(m.kv_cache_bytes_per_gpu, 'B')} of KV per GPU "
                        f"(at most {m.max_batch_sequences:,} fit): 'if the KV cache does not bloat' means a mean "
                        f"context under {ctx / 8192:.0%} of 8k")


def serve() -> Plan:
    return S.run(S.SERVE_A100)


def per_expert(batch: int, pipelined: bool) -> Finding:
    p = S.run(S.SERVE_A100, batch=batch)
    v = p.moe.tokens_per_expert_per_weight_read if pipelined else p.moe.tokens_per_expert
    bad = None
    if pipelined and p.inputs.layout.pp > 1:
        bad = (f"with PP16 the 4k batch moves as {p.inputs.layout.pp} micro-batches of "
               f"{p.roofline.tokens_per_weight_read:.0f}; "
               f"each read of an expert's weights serves ~{v:.0f} tokens, not ~500")
    where = f"batch {batch:,} x top-2 / 16 experts" + (", per PP16 micro-batch" if pipelined else "")
    return Finding(f"{v:.3g} token" + ("" if v == 1 else "s"), where, value=v, inconsistency=bad)


def params_per_node(claimed: Claimed) -> Finding:
    p = serve()
    v = p.memory.weights_params_per_node
    per_gpu = claimed.value * 2 / p.inputs.hardware.gpus_per_nvlink_domain  # the article's 130B, in FP16
    bad = None if per_gpu < FP16_GB_CLAIM else (f"130B per 8-GPU node is {si(per_gpu, 'B')} per GPU at FP16, over "
                                           f"the article's own '< 30 GB'; {si(p.params.total)} / 16 stages = "
                                           f"{si(v)} fits both")
    return Finding(si(v), f"gpt4 {si(p.params.total)} over 16 pipeline stages of one 8-GPU node", value=v,
                   inconsistency=bad)


def gb_per_gpu(weight_bytes: int) -> Finding:
    p = S.run(S.SERVE_A100, weight_bytes=weight_bytes)
    v = p.memory.weights_bytes_per_gpu
    return Finding(si(v, "B"), f"{si(p.params.total)} x {weight_bytes} B / 128 GPUs", value=v)


def stages(claimed: Claimed) -> Finding:
    p = serve()
    layer_nodes = p.inputs.layout.pp - 1  # article: the head node does data loading and the embedding
    v = p.model.n_layers / layer_nodes
    return Finding(f"{v:g} layers per node", f"{p.model.n_layers} layers over {layer_nodes} of the PP16 nodes; "
                   "the 16th (head) node holds the embedding", value=v,
                   note=f"an even split over all 16 stages would be {p.parallelism.layers_per_stage:g} layers")


T_BW, T_KV = "Inference: bandwidth and speed", "Inference: KV cache and MQA"
T_MOE = "Inference: MoE batching and layout"

CHECKS: list[Check] = [
    Check("I1", T_BW, "reading 250 words/min needs at least 8.33 tokens/s", Claimed("8.33 tok/s", 25 / 3),
          lambda _: reading(0)),
    Check("I2", T_BW, "fast readers (1,000 words/min) need 33.33 tokens/s", Claimed("33.33 tok/s", 100 / 3),
          lambda _: reading(1)),
    Check("I3", T_BW, "a 1T dense model cannot reach 33.33 tokens/s even on 8 H100s",
          Claimed("< 33.33 tok/s", 100 / 3, bound="<"), dense_1t_speed),
    Check("I4", T_BW, "8 H100s at 20 tokens/s use under 5% of their FLOPS", Claimed("< 5%", 0.05, bound="<"),
          dense_1t_mfu),
    Check("I5", T_BW, "so 8-way TP H100 inference is bounded at ~300B feed-forward parameters",
          Claimed("~300B", 300e9), ffn_bound),
    Check("I6", T_BW, "at batch 256 each byte read serves 512 FLOPs (1,024 at 512)", Claimed("512 FLOP/B", 512),
          intensity),
    Check("I7", T_BW, "batch 256-512 is closer to the H100's FLOPS : bandwidth ratio", Claimed("close"), ridge),
    Check("K1", T_KV, "a 500B+ MHA model's KV cache at batch 512 x 2,048 context is 3 TB", Claimed("3 TB", 3e12),
          lambda _: kv_mha(0)),
    Check("K2", T_KV, "... 3x the model's parameters", Claimed("3x", 3.0), lambda _: kv_mha(1)),
    Check("K3", T_KV, "MQA (one KV head) shrinks the KV cache greatly", Claimed("much smaller"), kv_mqa),
    Check("K4", T_KV, "without MQA the 8k GPT-4 would be severely batch-limited", Claimed("severely limited"),
          mqa_batch),
    Check("K5", T_KV, "32k GPT-4 absolutely cannot run on 40 GB A100s", Claimed("cannot run"), ctx32k),
    Check("K6", T_KV, "the 40 GB A100s hold the 4k+ batch at 8k context if the KV cache does not bloat",
          Claimed("8k context", 8192), batch_4k_fits),
    Check("E1", T_MOE, "at batch 8, top-2 of 16 experts: an expert may see a batch of 1", Claimed("1 token", 1.0),
          lambda _: per_expert(8, False)),
    Check("E2", T_MOE, "batch 4k+ gives each expert only ~500 tokens", Claimed("~500 tokens", 500),
          lambda _: per_expert(4096, False)),
    Check("E3", T_MOE, "... per weight read, with 16-way pipeline micro-batching", Claimed("~500 tokens", 500),
          lambda _: per_expert(4096, True)),
    Check("E4", T_MOE, "128-GPU serving (TP8 x PP16): each 8-GPU node holds ~130B parameters",
          Claimed("~130B", 130e9), params_per_node),
    Check("E5", T_MOE, "... under 30 GB per GPU in FP16", Claimed("< 30 GB", FP16_GB_CLAIM, bound="<"),
          lambda _: gb_per_gpu(2)),
    Check("E6", T_MOE, "... under 15 GB per GPU in FP8/int8", Claimed("< 15 GB", 15e9, bound="<"),
          lambda _: gb_per_gpu(1)),
    Check("E7", T_MOE, "120 layers split across 15 nodes, fewer on the head node", Claimed("8 per node", 8.0),
          stages),
]
