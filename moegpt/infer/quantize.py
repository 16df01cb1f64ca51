"""``moegpt quantize``: a full-precision model directory -> a quantized one (compressed-tensors
pack-quantized, checkpoint/quantized.py) that serve / generate / LLM load unchanged, written only
when it passes its quality gates.

The gates compare the quantized model with the original on the bundled validation split (the last
5% of each source of the training mixture, tokenized with the model's own tokenizer): perplexity
may rise by at most ``max_perplexity_increase`` and the most likely next token must agree on at
least ``min_top1_agreement`` of the positions. The quantized model's logits are computed as
generation computes them, teacher-forced through the decode program (decode_eval.py, int8
activations included); the forward's (weights quantized, activations not) are reported beside. A failure exits with status 2 naming the numbers,
and nothing is written.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moegpt.atomic import write_text_atomic
from moegpt.checkpoint.model_dir import load, read_hf_config, save
from moegpt.data.dataset import build_mixture
from moegpt.data.sources import default_mixture
from moegpt.infer.decode_eval import decoded_logits
from moegpt.quant.model import quantize_model, weight_bytes
from moegpt.quant.quality import Quality, compare, gate_failures
from moegpt.quant.scheme import QuantScheme

# Default gates per bits: the budget for the demo model (int8 +1%, int4 g32 +5% perplexity).
DEFAULT_MAX_PERPLEXITY_INCREASE = {8: 0.01, 4: 0.05}
DEFAULT_MIN_TOP1_AGREEMENT = {8: 0.95, 4: 0.85}


@dataclass(frozen=True, kw_only=True)
class Gates:
    max_perplexity_increase: float  # e.g. 0.01: +1%
    min_top1_agreement: float
    eval_sequences: int = 64
    seq_len: int = 128


class QualityGateFailed(ValueError):
    """The quantized model missed a gate (the message names the numbers)."""


def quantize_directory(model_dir: str | Path, out: str | Path, scheme: QuantScheme, gates: Gates,
                       cache_dir: str | Path, embedding: bool = False) -> dict:
    """Quantize ``model_dir`` into ``out`` if it passes ``gates``, the embedding table too with
    ``embedding``; returns the report (also written as OUT/quantize.json). Raises ValueError
    (QualityGateFailed for a missed gate) before writing."""
    model_dir, out = Path(model_dir), Path(out)
    if "quantization_config" in read_hf_config(model_dir):
        raise ValueError(f"{model_dir} is quantized already")
    if (model_dir / "vision_config.json").exists():
        raise ValueError(f"{model_dir} is a vision model: quantize its text model directory")
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the model directory itself")
    if gates.eval_sequences < 1 or gates.seq_len < 2:
        raise ValueError(f"eval sequences {gates.eval_sequences} and seq len {gates.seq_len} must be >= 1 and >= 2")
    reference, tokenizer = load(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: the quality gates read the validation split with it")
    quantized = copy.deepcopy(reference)
    full_bytes = weight_bytes(reference)
    quantize_model(quantized, scheme, embedding)  # raises naming a weight whose inputs a group size does not divide
    seq_len = min(gates.seq_len, reference.cfg.max_seq_len)
    data = build_mixture(default_mixture(), tokenizer, seq_len, cache_dir)
    blocks = list(data.val_batches(8, max_sequences=gates.eval_sequences))
    forward = compare(lambda x: reference(x).logits, lambda x: quantized(x).logits, blocks)
    # what generation gets: the decode program, with its int8 activations (quant/scheme.py)
    quality = compare(lambda x: reference(x).logits, lambda x: torch.stack(list(decoded_logits(quantized, x)), 1),
                      blocks)
    report = {"scheme": scheme.name, "format": "compressed-tensors pack-quantized", "embedding_quantized": embedding,
              **asdict(quality),
              "perplexity_increase": quality.perplexity_increase, "forward_perplexity": forward.perplexity,
              "forward_top1_agreement": forward.top1_agreement, "weight_bytes": weight_bytes(quantized),
              "full_precision_weight_bytes": full_bytes, "gates": asdict(gates)}
    failures = gate_failures(quality, gates.max_perplexity_increase, gates.min_top1_agreement)
    if failures:
        raise QualityGateFailed(f"{scheme.name} failed its quality gates, nothing written: {'; '.join(failures)}")
    save(quantized, tokenizer, out)
    write_text_atomic(out / "quantize.json", json.dumps(report, indent=2) + "\n")
    return report


def describe(report: dict) -> str:
    q = Quality(perplexity=report["perplexity"], reference_perplexity=report["reference_perplexity"],
                top1_agreement=report["top1_agreement"], tokens=report["tokens"])
    return (f"{report['scheme']}: perplexity {q.reference_perplexity:.3f} -> {q.perplexity:.3f} "
            f"({q.perplexity_increase:+.2%}), top-1 agreement {q.top1_agreement:.2%} over {q.tokens} validation "
            f"tokens, decoding as generation does (the forward, activations unquantized: "
            f"{report['forward_perplexity']:.3f}, {report['forward_top1_agreement']:.2%}); weights {report['full_precision_weight_bytes'] / 1e6:.1f} MB -> "
            f"{report['weight_bytes'] / 1e6:.1f} MB ({report['weight_bytes'] / report['full_precision_weight_bytes']:.3f}x"
            f"{', the embedding table included' if report.get('embedding_quantized') else ''})")

