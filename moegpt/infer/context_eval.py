"""What a context extension bought: passkey retrieval by length and depth, and perplexity by
position on held-out text, for the model before (plain RoPE run past its context) and after.

``moegpt finetune --context`` runs ``context_report`` on the base and the tuned directory and
writes OUT/context_eval.json and, with matplotlib, OUT/context_ppl.png.

Legend: N windows, L window length (the extended context).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moegpt.data.chat import ChatFormat
from moegpt.data.passkey import passkey_grid
from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.chat_eval import exact_match
from moegpt.model import MoEGPT

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def passkey_table(model: MoEGPT, tokenizer: Tokenizer, fmt: ChatFormat, lengths: Sequence[int],
                  per_cell: int, seed: int = 1234) -> dict[str, dict]:
    """{"L@D": {"n", "correct", "exact_match"}} for each length and depth, plus "all"."""
    count = lambda conv: len(fmt.tokens(tokenizer, list(conv))[0])  # noqa: E731
    convs, tasks = passkey_grid(count, lengths, DEPTHS, per_cell, seed)
    return exact_match(model, tokenizer, fmt, convs, tasks, max_tokens=16)


@torch.no_grad()
def loss_by_position(model: MoEGPT, windows: torch.Tensor, batch: int = 4) -> np.ndarray:
    """windows (N, L + 1) -> the mean next-token loss (nats) at each position (L,)."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for first in range(0, windows.shape[0], batch):
        w = windows[first:first + batch]
        logits = model(w[:, :-1]).logits.float()  # (n, L, V)
        nll = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")  # (n, L)
        total += nll.sum(0).double()
    return (total / windows.shape[0]).numpy()


def bucketed_perplexity(losses: np.ndarray, bucket: int) -> list[float]:
    """Perplexity over each run of ``bucket`` positions."""
    return [math.exp(float(losses[i:i + bucket].mean())) for i in range(0, len(losses), bucket)]


def perplexities(model: MoEGPT, windows: torch.Tensor, original: int, bucket: int) -> dict:
    """Perplexity of held-out windows (N, L + 1): by position (means over ``bucket``), below the
    original context, and over all L positions."""
    losses = loss_by_position(model, windows)
    return {"perplexity_by_position": bucketed_perplexity(losses, bucket),
            "perplexity_below_original": math.exp(float(losses[:original].mean())),
            "perplexity_all": math.exp(float(losses.mean()))}


def context_report(before: MoEGPT, after: MoEGPT, tokenizer: Tokenizer, fmt: ChatFormat, original: int,
                   windows: torch.Tensor, per_cell: int = 20, bucket: int = 32, reference: MoEGPT | None = None) -> dict:
    """Both models on the same passkey grid (lengths original/2 .. 4x, as the extension allows) and
    the same held-out windows; ``before`` must accept the extended length (its max_seq_len raised).
    ``reference``: the pre-trained model whose text perplexity the extension is compared with, when
    ``before`` was tuned at its context first (its max_seq_len raised too); default ``before``."""
    extended = after.cfg.max_seq_len
    lengths = sorted({original // 2, original, *range(2 * original, extended + 1, original)} | {extended})
    report: dict = {"original_context": original, "extended_context": extended, "depths": list(DEPTHS),
                    "lengths": lengths, "per_cell": per_cell, "bucket": bucket, "windows": int(windows.shape[0])}
    for name, model in (("before", before), ("after", after)):
        report[name] = {"passkey": passkey_table(model, tokenizer, fmt, lengths, per_cell),
                        **perplexities(model, windows, original, bucket)}
    if reference is not None:
        report["reference"] = perplexities(reference, windows, original, bucket)
    report["perplexity_below_original_ratio"] = (report["after"]["perplexity_below_original"]
                                                 / report.get("reference", report["before"])["perplexity_below_original"])
    return report


def print_report(report: dict) -> None:
    lengths, depths = report["lengths"], report["depths"]
    print(f"\npasskey retrieval (exact match, {report['per_cell']} per cell; before -> after), "
          f"context {report['original_context']} -> {report['extended_context']}:")
    print("  length " + "".join(f"  depth {d:4.2f}    " for d in depths))
    for length in lengths:
        cells = []
        for d in depths:
            key = f"{length}@{d:.2f}"
            b, a = report["before"]["passkey"][key]["exact_match"], report["after"]["passkey"][key]["exact_match"]
            cells.append(f"  {b:4.0%} -> {a:4.0%}  ")
        print(f"  {length:6d} " + "".join(cells))
    b, a = report.get("reference", report["before"]), report["after"]
    against = f" (the reference {report.get('reference_model', 'model')} -> after)" if "reference" in report else ""
    print(f"held-out {report.get('perplexity_text', 'text')} perplexity at positions < {report['original_context']}"
          f"{against}: {b['perplexity_below_original']:.3f} -> {a['perplexity_below_original']:.3f} "
          f"({report['perplexity_below_original_ratio'] - 1:+.2%}); "
          f"all positions: {b['perplexity_all']:.3f} -> {a['perplexity_all']:.3f}")


def plot_perplexity(report: dict, path: Path) -> Path | None:
    """Perplexity by position before (or the reference) and after (PNG); None, with a line printed,
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("moegpt: matplotlib is not installed (pip install 'moegpt[plot]'): no perplexity plot")
        return None
    bucket = report["bucket"]
    fig, ax = plt.subplots(figsize=(8, 5))
    # with a reference, the text curves are its and the tuned model's (the base's is in the report)
    for name in ("reference", "after") if "reference" in report else ("before", "after"):
        ppl = report[name]["perplexity_by_position"]
        label = {"reference": "reference (pre-trained, plain RoPE)", "before": "before (plain RoPE)"}.get(name, name)
        ax.plot([bucket * (i + 0.5) for i in range(len(ppl))], ppl, marker="o", label=label)
    ax.axvline(report["original_context"], color="grey", linestyle="--", label="original context")
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel(f"perplexity (held-out text, mean over {bucket} positions)")
    ax.set_title(f"context {report['original_context']} -> {report['extended_context']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def held_out_windows(data, tokenizer: Tokenizer, length: int, cache_dir: Path, val_fraction: float) -> tuple[str, torch.Tensor]:
    """(name, windows (N, L + 1)): the held-out rows of the run's first plain-text source (``data``:
    the trainer's SFTData), else of the bundled text corpus."""
    from moegpt.data.sft import CorpusSet, corpus_examples
    from moegpt.data.sources import shakespeare_source

    for source, rows in zip(data.sources, data.val):
        if isinstance(source, CorpusSet):
            return source.name, torch.cat([rows.inputs, rows.targets[:, -1:]], dim=1)
    held_out = corpus_examples(CorpusSet(name="text", epochs=1.0, source=shakespeare_source()), tokenizer, length,
                               cache_dir, val_fraction)[1]
    return "text", torch.tensor([ids for ids, _ in held_out])


def context_evaluation(base_dir: Path, out: Path, ft, trainer, per_cell: int, cache_dir: Path,
                       reference_dir: Path | None = None) -> dict:
    """``moegpt finetune --context``'s report: the base directory (plain RoPE, its max_seq_len raised
    to the extended one) against the tuned one; ``reference_dir``: the model whose text perplexity
    the tuned one's is compared with (default: the base)."""
    import json

    from moegpt.atomic import write_text_atomic
    from moegpt.checkpoint.model_dir import load
    from moegpt.model import build_model

    def past_its_context(directory: Path):  # plain RoPE, max_seq_len raised to the extended one
        loaded, tokenizer = load(directory)
        model = build_model(ft.model_cfg.replace(rope_scaling=None), device="meta")
        model.load_state_dict(loaded.state_dict(), assign=True)
        return model.eval(), tokenizer, loaded.cfg.max_seq_len

    before, tokenizer, original = past_its_context(base_dir)
    reference = past_its_context(reference_dir)[0] if reference_dir is not None else None
    after, _ = load(out)
    name, windows = held_out_windows(trainer.data, tokenizer, after.cfg.max_seq_len, cache_dir, trainer.cfg.val_fraction)
    report = context_report(before, after.eval(), tokenizer, ft.chat, original, windows, per_cell, reference=reference)
    report["perplexity_text"] = name
    if reference_dir is not None:
        report["reference_model"] = str(reference_dir)
    write_text_atomic(out / "context_eval.json", json.dumps(report, indent=2) + "\n")
    print_report(report)
    png = plot_perplexity(report, out / "context_ppl.png")
    print(f"report: {out / 'context_eval.json'}" + (f", plot: {png}" if png else ""))
    return report
