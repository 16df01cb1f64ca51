"""The decode benchmarks' byte accounting (bench/decode_paired.py): what a step reads is counted once
per tensor, so a fraction of the read bandwidth above 1 means a fast kernel, not a double count."""

import torch

from bench.decode_paired import weight_bytes
from moegpt.config import preset
from moegpt.counts import param_counts
from moegpt.model import build_model
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import parse_scheme


def test_every_shared_weight_is_counted_once_in_full_precision_and_quantized():
    cfg = preset("tiny")
    c = param_counts(cfg)
    for dtype in (torch.float32, torch.bfloat16):
        shared, expert = weight_bytes(build_model(cfg, seed=0, dtype=dtype))
        itemsize = torch.empty(0, dtype=dtype).element_size()
        assert shared == (c.shared - cfg.vocab_size * cfg.d_model) * itemsize  # all but the embedding table
        assert expert == c.experts_total // (cfg.n_layers * cfg.n_experts) * itemsize
    model = quantize_model(build_model(cfg, seed=0), parse_scheme("int8"))
    shared, expert = weight_bytes(model)
    D, F, V, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.q_dim
    packed = cfg.n_layers * (H + 2 * cfg.kv_dim + D) * D + V * D  # attention and the head, a byte each ...
    scales = (cfg.n_layers * (H + 2 * cfg.kv_dim + D) + V) * 4  # ... and an fp32 scale per output channel
    vectors = (c.router + c.norms) * 4
    assert shared == packed + scales + vectors
    assert expert == 3 * F * D + (2 * F + D) * 4
