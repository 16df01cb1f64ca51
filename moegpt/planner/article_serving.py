"""The article's claims on serving cost, latency, speculative decoding and vision, plus the figures
it cites from elsewhere (which no planner input determines).

Every "ours" value comes from the planner over the article's stated set-up
(moegpt.planner.scenarios); the article's derived figures appear only in ``Claimed``.
"""

from __future__ import annotations

from moegpt.planner import scenarios as S
from moegpt.planner.article_inference import SERVE, reader_speed
from moegpt.planner.claims import Check, Claimed, Finding
from moegpt.planner.table import si

DAVINCI_SERVE = dict(preset="davinci", hardware="a100-40gb", tp=8, pp=2, gpus=16, gpu_hour_usd=1.0)


def implied_mfu(setup: dict, usd_per_1k: float) -> float:
    """The MFU a claimed cost per 1k tokens implies for ``setup`` (the inverse of the cost formula)."""
    p = S.run(setup)
    tps = p.inputs.gpus * setup["gpu_hour_usd"] / 3600 / usd_per_1k * 1000
    peak = p.inputs.hardware.peak_for(p.inputs.precision.weight_bytes)
    return tps * p.flops.forward_per_token / (p.inputs.gpus * peak)


def cost_a100(claimed: Claimed) -> Finding:
    c = S.run(S.SERVE_A100).inference_cost
    return Finding(f"${c.usd_per_1k_tokens:.4f}", SERVE + " (roofline throughput; 4,096 full 8k KV caches would "
                   "not fit, see K6)", value=c.usd_per_1k_tokens,
                   note=f"ours runs at {c.implied_mfu:.1%} MFU; {claimed.text} implies "
                        f"{implied_mfu(S.SERVE_A100, claimed.value):.1%}")


def cost_h100(claimed: Claimed) -> Finding:
    c = S.run(S.SERVE_H100).inference_cost
    fp8 = S.run(S.SERVE_H100, weight_bytes=1).inference_cost.usd_per_1k_tokens
    return Finding(f"${c.usd_per_1k_tokens:.4f}", SERVE.replace("A100-40GB", "H100").replace("$1/h", "$2/h"),
                   value=c.usd_per_1k_tokens,
                   note=f"with FP8 weights ${fp8:.4f}; at BF16 the H100's 2.15x bandwidth costs 2x the price, "
                        f"so {claimed.text} needs {implied_mfu(S.SERVE_H100, claimed.value):.1%} MFU")


def active_vs_davinci(claimed: Claimed) -> Finding:
    p = S.run()
    v = p.derived.active_params_ratio_vs_davinci
    return Finding(f"{v:.2f}x", f"gpt4 active ({si(p.params.active_per_token)}) / davinci "
                   f"({si(p.params.active_per_token / v, digits=4)})", value=v)


def cost_vs_davinci(claimed: Claimed) -> Finding:
    def at_max_batch(setup: dict):
        fit = S.run(setup, batch=1).memory.max_batch_sequences
        return fit, S.run(setup, batch=fit).inference_cost.usd_per_1k_tokens

    gpt4_setup = dict(S.SERVE_A100)
    del gpt4_setup["batch"]
    (bg, g), (bd, d) = at_max_batch(gpt4_setup), at_max_batch(DAVINCI_SERVE)
    _, g_sharded = at_max_batch(dict(gpt4_setup, kv_sharding="batch"))
    return Finding(f"{g / d:.1f}x", f"each at the largest batch its 40 GB A100s hold: gpt4 {bg} x 8k on 128 "
                   f"(TP8 x PP16), davinci {bd} x 2k on 16 (TP8 x PP2); replicated KV",
                   value=g / d, note=f"with GPT-4's MQA cache split by sequence: {g_sharded / d:.2f}x; the "
                                     "ratio hangs on batch and KV layout")


def reading_speed_small_batch(claimed: Claimed) -> Finding:
    v = S.run(S.SERVE_A100, batch=16).decode.tokens_per_s_per_user
    return Finding(f"{v:.1f} tok/s per user", "128 A100-40GB, TP8 x PP16, batch 16 (one sequence per stage)",
                   holds=v >= reader_speed(0))


def reading_speed_4k(claimed: Claimed) -> Finding:
    d = S.run(S.SERVE_A100).decode
    slow = reader_speed(0)  # the 250 words/min reader
    bad = None if d.tokens_per_s_per_user >= slow else (
        f"at the 4k batch behind its cost figures a token crosses 16 stages of {d.stage_time_s * 1e3:.1f} ms: "
        f"{d.tokens_per_s_per_user:.2f} tok/s per user, below reading speed")
    return Finding(f"{d.tokens_per_s_per_user:.2f} tok/s per user", SERVE, value=d.tokens_per_s_per_user,
                   inconsistency=bad)


def speculative(claimed: Claimed) -> Finding:
    p = S.run(draft_tokens=S.DRAFT_TOKENS, acceptance_rate=S.ACCEPTANCE)
    v = p.decode.speculative_tokens_per_pass
    longer = S.run(draft_tokens=2 * S.DRAFT_TOKENS, acceptance_rate=S.ACCEPTANCE).decode.speculative_tokens_per_pass
    return Finding(f"{v:.2f} tokens per pass", f"4 drafted tokens, acceptance {S.ACCEPTANCE:g} per token (assumed)",
                   value=v, note=f"8 drafted tokens give {longer:.2f}: agreeing on long runs is exponentially rare")


def speculative_small_batch(claimed: Claimed) -> Finding:
    d = S.run(S.SERVE_A100).decode
    return Finding(f"batch 4k is {d.t_mem_s / d.t_compute_s:.1f}x memory-bound", SERVE,
                   holds=d.t_compute_s >= d.t_mem_s,
                   note="per-micro-batch expert reads and the KV stream keep GPT-4 decode bandwidth-bound on "
                        "A100 even at 4k, so drafting still pays there")


def vision_io(claimed: Claimed) -> Finding:
    v = S.run(S.BYTES_PER_TOKEN).derived.vision_io_ratio
    return Finding(f"{v:.0f}x", "600 bytes per vision token / 4 bytes per text token", value=v)


def price(claimed: Claimed) -> Finding:
    c = S.run(S.SERVE_A100).inference_cost.usd_per_1k_tokens
    return Finding(f"cost ${c:.4f}", SERVE, note="a list price (margin included), not derivable from hardware; "
                   f"{claimed.value / c:.0f}x our cost")


def cited(what: str) -> Finding:
    return Finding("-", "none", note=f"an external figure ({what}); no planner input determines it")


T_COST, T_SPEC, T_CITED = "Serving cost and latency", "Speculative decoding and vision", "Figures cited from elsewhere"

CHECKS: list[Check] = [
    Check("C1", T_COST, "$0.0049 per 1k tokens on 128 A100s (8k, high utilisation)", Claimed("$0.0049", 0.0049),
          cost_a100),
    Check("C2", T_COST, "$0.0021 per 1k tokens on 128 H100s", Claimed("$0.0021", 0.0021), cost_h100),
    Check("C3", T_COST, "GPT-4 has 1.6x Davinci's forward (active) parameters", Claimed("1.6x", 1.6),
          active_vs_davinci),
    Check("C4", T_COST, "... yet costs 3x Davinci (bigger cluster, lower utilisation)", Claimed("3x", 3.0),
          cost_vs_davinci),
    Check("C5", T_COST, "OpenAI serves GPT-4 on A100s at human reading speed", Claimed(">= 8.33 tok/s"),
          reading_speed_small_batch),
    Check("C6", T_COST, "... while running the 4k+ batches its cost figures assume",
          Claimed(">= 8.33 tok/s", 25 / 3, bound=">="), reading_speed_4k),
    Check("C7", T_COST, "GPT-4 is offered at only $0.06 per 1k tokens", Claimed("$0.06 (price)", 0.06), price),
    Check("S1", T_SPEC, "speculative decoding with ~4-token draft sequences", Claimed("~4 tokens", 4.0), speculative),
    Check("S2", T_SPEC, "speculative decoding helps only at small batch, where bandwidth binds",
          Claimed("small batch only"), speculative_small_batch),
    Check("S3", T_SPEC, "vision data costs ~150x more I/O per token", Claimed("~150x", 150), vision_io),
    Check("X1", T_CITED, "PaLM trained on ~780B tokens; PaLM 2 on ~5T", Claimed("780B; 5T"),
          lambda _: cited("Google's reports")),
    Check("X2", T_CITED, "vision fine-tuning on ~2T further tokens", Claimed("~2T"), lambda _: cited("a rumour")),
    Check("X3", T_CITED, "64-128 experts reach lower loss than 16", Claimed("64-128"), lambda _: cited("research")),
    Check("X4", T_CITED, "Meta: >100,000 H100s by year end, largest cluster >25,000", Claimed(">100k; >25k"),
          lambda _: cited("fleet reports")),
]
