"""The planner's charts (matplotlib, Agg backend; imported only here).

1. Memory bandwidth needed vs tokens/s per user, dense models of several sizes, with the aggregate
   bandwidth of 8-GPU servers (the article's chart: batch 1, overhead = parameter reads).
2. MFU and cost per 1k tokens vs batch, MoE (gpt4) vs a dense model with the same active parameters,
   on the article's 128-GPU TP8 x PP16 serving cluster: the per-expert batch effect.
3. KV cache vs context, MHA vs GQA vs MQA: bytes per sequence, and sequences that fit.
Every point is a plan from moegpt.planner; nothing is drawn that the planner did not compute.
"""

from __future__ import annotations

from pathlib import Path

from moegpt.planner import scenarios as S
from moegpt.planner.hardware import datasheet
from moegpt.planner.presets import planner_preset, with_total_params

DENSE_SIZES = (175e9, 300e9, 540e9, 1e12, 2e12)  # parameters
SERVERS = ("a100-40gb", "a100-80gb", "h100-sxm", "h200")
BATCHES = tuple(2**i for i in range(13))  # 1 .. 4096
CONTEXTS = tuple(2**i for i in range(10, 18))  # 1k .. 128k


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bandwidth_chart(path: Path) -> Path:
    plt = _pyplot()
    tps = [1 + i for i in range(50)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    base = planner_preset("dense-1t")
    for size in DENSE_SIZES:
        cfg = with_total_params(base, size)
        need = [S.run(S.CHART_8XH100, preset="dense-1t", model=cfg, target_tps=t).decode.bandwidth_required_bytes_per_s
                for t in tps]
        total = S.run(S.CHART_8XH100, model=cfg).params.total
        ax.plot(tps, [b / 1e12 for b in need], label=f"dense {total / 1e9:,.0f}B")
    for name, color in zip(SERVERS, ("silver", "gray", "black", "saddlebrown")):
        hw = datasheet(name)
        ax.axhline(8 * hw.hbm_bytes_per_s / 1e12, color=color, linestyle="--", label=f"8 x {name} (HBM total)")
    for speed in (25 / 3, 100 / 3):  # the article's reading speeds (250 and 1,000 words/min at 2 tokens/word)
        ax.axvline(speed, color="black", linewidth=0.6, linestyle=":")
        ax.text(speed + 0.4, 0.97, f"{speed:.2f} tok/s", rotation=90, fontsize=8, va="top",
                transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (batch 1)")
    ax.set_ylabel("memory bandwidth needed (TB/s, log)")
    ax.set_title("Dense models: bandwidth to stream every weight per token\n(BF16, overhead = parameter reads, 2x)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def batch_chart(path: Path, hardware: str = "a100-40gb") -> Path:
    plt = _pyplot()
    gpt4 = planner_preset("gpt4")
    # same active parameters: every layer one MLP as wide as the top-k experts together
    dense = gpt4.replace(n_experts=1, top_k=1, d_ff=gpt4.d_ff * gpt4.top_k, moe_every=gpt4.n_layers + 1)
    setup = dict(S.SERVE_A100, hardware=hardware, kv_sharding="batch")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.8))
    for label, cfg in (("MoE gpt4 (1.83T, 282B active)", gpt4), ("dense, same 282B active", dense)):
        plans = [S.run(setup, model=cfg, batch=b) for b in BATCHES]
        fits = [p.memory.fits for p in plans]
        mfu = [p.decode.mfu * 100 for p in plans]
        usd = [p.inference_cost.usd_per_1k_tokens for p in plans]
        line, = a1.plot(BATCHES, mfu, marker="o", markersize=3, label=label)
        a2.plot(BATCHES, usd, marker="o", markersize=3, color=line.get_color(), label=label)
        for ax, ys in ((a1, mfu), (a2, usd)):  # hollow markers: the KV cache no longer fits
            ax.plot([b for b, f in zip(BATCHES, fits) if not f], [y for y, f in zip(ys, fits) if not f], "o",
                    markerfacecolor="white", color=line.get_color())
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (sequences in flight, 8k context)")
        ax.grid(True, which="both", alpha=0.3)
    a1.set_ylabel("MFU (%)")
    a1.set_title("MFU: MoE reads more expert weights per token")
    a2.set_yscale("log")
    a2.set_ylabel("USD per 1k tokens (log, $1/GPU-hour)")
    a2.set_title("cost per 1k generated tokens")
    a1.legend(fontsize=8, title="hollow: KV cache does not fit", title_fontsize=8)
    fig.suptitle(f"128 x {hardware}, TP8 x PP16, decode roofline (PP16 splits each batch into 16 micro-batches)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kv_chart(path: Path, hardware: str = "a100-40gb") -> Path:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.8))
    # GQA-8 and replicated MQA coincide on the right (one KV head per GPU at TP8): GQA is drawn wide
    # and hollow underneath, so both stay visible
    wide = dict(marker="s", markersize=8, markerfacecolor="none", linewidth=4, alpha=0.5)
    variants = (("gpt4-mha", "replicated", "MHA (96 KV heads)", {}), ("gpt4-gqa", "replicated", "GQA (8 KV heads)", wide),
                ("gpt4", "replicated", "MQA (1 KV head)", {}),
                ("gpt4", "batch", "MQA, KV split by sequence over TP", dict(linestyle="--")))
    for preset, sharding, label, extra in variants:
        plans = [S.run(S.SERVE_A100, preset=preset, hardware=hardware, batch=1, context=c, kv_sharding=sharding)
                 for c in CONTEXTS]
        style = dict(marker="o", markersize=3, **extra) if "marker" not in extra else dict(extra)
        if sharding == "replicated":  # the whole model's cache per sequence does not depend on the layout
            a1.plot(CONTEXTS, [p.memory.kv_cache_bytes_per_sequence / 1e9 for p in plans], label=label, **style)
        a2.plot(CONTEXTS, [max(p.memory.max_batch_sequences, 0.5) for p in plans], label=label, **style)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_ylabel("KV cache per sequence (GB, BF16, log)")
    a1.set_title("KV cache of one sequence (GPT-4-sized, 120 layers)")
    a2.set_ylabel("sequences that fit (log; 0.5 = none)")
    a2.set_title(f"batch that fits beside the weights, 128 x {hardware}\n"
                 "(TP8: GQA-8 and replicated MQA both hold one KV head per GPU)", fontsize=10)
    fig.suptitle("KV cache vs context: multi-head, grouped-query and multi-query attention", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [bandwidth_chart(directory / "bandwidth_vs_tokens_per_s.png"),
            batch_chart(directory / "mfu_cost_vs_batch.png"), kv_chart(directory / "kv_cache_vs_context.png")]
