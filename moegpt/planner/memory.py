"""Memory per GPU: weights, KV cache (inference), gradients + optimizer + activations (training).

Legend: P params, L layers, D d_model, G kv heads, Dh head dim, B batch (sequences), C context,
S sequence length, tp/pp/dp/ep the parallel degrees, w bytes per weight, kvb bytes per KV value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moegpt.counts import ParamCounts, kv_cache_bytes_per_token
from moegpt.planner.inputs import PlanInputs

OPTIMIZER_BYTES_PER_PARAM = 12  # Adam: fp32 master weights + m + v (article: "probably ZeRO stage 1" shards these)
ACTIVATION_BYTES = 2  # BF16 activations
LAYER_WORKING_SET = 34  # bytes per (token x d_model) of one layer recomputed (Korthikanti et al. 2022)


@dataclass(frozen=True)
class Memory:
    weights_bytes_per_gpu: float
    weights_params_per_gpu: float
    weights_params_per_node: float
    grads_bytes_per_gpu: float | None
    optimizer_bytes_per_gpu: float | None
    activations_bytes_per_gpu: float | None
    training_state_bytes_per_gpu: float | None
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_token_per_gpu: float | None
    kv_cache_bytes_per_sequence: float | None
    kv_cache_bytes_total: float | None
    kv_cache_bytes_per_gpu: float | None
    kv_cache_tp_copies: float | None  # TP ranks holding the same KV head's cache (MQA at TP8: 8)
    kv_cache_bytes_all_gpus: float | None  # what the GPUs hold together, TP copies counted
    kv_cache_to_weights_ratio: float | None
    free_bytes_per_gpu: float
    max_batch_sequences: int | None
    fits: bool


def model_params_per_gpu(c: ParamCounts, tp: int, pp: int, ep: int) -> float:
    """Shared weights split over tp*pp; experts also over ep (the layers split evenly over stages).

    article: "about 30 GB of FP16 parameters per GPU" at TP8 x PP15; "about 130B per 8-GPU node" at PP16."""
    return (c.shared + c.experts_total / ep) / (tp * pp)


def kv_bytes_per_token_per_gpu(inp: PlanInputs) -> float:
    """K and V of one token for the layers one GPU holds.

    KV heads round up to one per TP rank (MQA's single head is copied onto every rank); with
    ``kv_sharding=batch`` the ranks holding copies hold different sequences instead (/ (tp/G))."""
    cfg, lay = inp.model, inp.layout
    G, tp = cfg.n_kv_heads, lay.tp
    heads_per_rank = math.ceil(G / tp)
    if lay.kv_sharding == "batch" and tp > G:
        heads_per_rank = G / tp
    # the whole model's K and V per token (counts.py, the one formula), for this GPU's heads and layers
    kv = kv_cache_bytes_per_token(cfg, inp.precision.kv_bytes, inp.precision.kv_scale_bytes)
    return kv * heads_per_rank / G / lay.pp


def kv_tp_copies(inp: PlanInputs) -> float:
    """How many TP ranks hold each KV head's cache: tp / G when TP is wider than the KV heads and
    they are replicated (the serving engine computes and caches MQA's head on every TP rank), else 1."""
    G, tp = inp.model.n_kv_heads, inp.layout.tp
    return tp / G if tp > G and inp.layout.kv_sharding == "replicated" else 1.0


def microbatches_per_replica(inp: PlanInputs) -> int:
    """m = floor(batch_tokens / seq_len / dp / micro_batch): the integer count the bubble uses."""
    w, lay = inp.workload, inp.layout
    return math.floor(w.batch_tokens / w.seq_len / lay.dp / lay.micro_batch)


def activation_bytes_per_gpu(inp: PlanInputs) -> float:
    """Full activation recomputation with sequence parallelism: the checkpointed input of each layer
    for every micro-batch in flight (1F1B: up to pp on the first stage), plus one layer's working set."""
    cfg, lay, S = inp.model, inp.layout, inp.workload.seq_len
    in_flight = max(1, min(lay.pp, microbatches_per_replica(inp)))
    tokens = lay.micro_batch * S  # tokens per micro-batch
    checkpoints = in_flight * (cfg.n_layers / lay.pp) * tokens * cfg.d_model * ACTIVATION_BYTES / lay.tp
    working = tokens * cfg.d_model * LAYER_WORKING_SET / lay.tp
    return checkpoints + working


def memory(inp: PlanInputs, c: ParamCounts) -> Memory:
    cfg, lay, w = inp.model, inp.layout, inp.workload
    wb = inp.precision.weight_bytes
    mem = inp.hardware.mem_bytes
    params_gpu = model_params_per_gpu(c, lay.tp, lay.pp, lay.ep)
    per_node = params_gpu * min(inp.hardware.gpus_per_nvlink_domain, inp.gpus)
    kv_token = kv_cache_bytes_per_token(cfg, inp.precision.kv_bytes, inp.precision.kv_scale_bytes)
    if inp.mode == "train":
        sharded = {stage: (lay.dp if lay.zero_stage >= stage else 1) for stage in (1, 2, 3)}
        weights = params_gpu * wb / sharded[3]
        grads = params_gpu * wb / sharded[2]  # gradients in the weights' precision
        optimizer = params_gpu * OPTIMIZER_BYTES_PER_PARAM / sharded[1]
        activations = activation_bytes_per_gpu(inp)
        state = weights + grads + optimizer + activations
        return Memory(
            weights_bytes_per_gpu=weights, weights_params_per_gpu=params_gpu / sharded[3],
            weights_params_per_node=per_node / sharded[3], grads_bytes_per_gpu=grads,
            optimizer_bytes_per_gpu=optimizer, activations_bytes_per_gpu=activations,
            training_state_bytes_per_gpu=state, kv_cache_bytes_per_token=kv_token,
            kv_cache_bytes_per_token_per_gpu=None, kv_cache_bytes_per_sequence=None, kv_cache_bytes_total=None,
            kv_cache_bytes_per_gpu=None, kv_cache_tp_copies=None, kv_cache_bytes_all_gpus=None,
            kv_cache_to_weights_ratio=None, free_bytes_per_gpu=mem - state,
            max_batch_sequences=None, fits=state <= mem,
        )
    weights = params_gpu * wb
    kv_gpu_token = kv_bytes_per_token_per_gpu(inp)
    # Each GPU keeps its stage's layers of every sequence in the batch (all micro-batches in flight).
    # article: "KV cache ... must be streamed too", and it limits the batch on 40 GB A100s
    kv_gpu = w.batch * w.context * kv_gpu_token
    kv_total = w.batch * w.context * kv_token  # one replica's cache, counted once (no TP copies)
    free_for_kv = mem - weights
    return Memory(
        weights_bytes_per_gpu=weights, weights_params_per_gpu=params_gpu, weights_params_per_node=per_node,
        grads_bytes_per_gpu=None, optimizer_bytes_per_gpu=None, activations_bytes_per_gpu=None,
        training_state_bytes_per_gpu=None, kv_cache_bytes_per_token=kv_token,
        kv_cache_bytes_per_token_per_gpu=kv_gpu_token, kv_cache_bytes_per_sequence=w.context * kv_token,
        kv_cache_bytes_total=kv_total, kv_cache_bytes_per_gpu=kv_gpu, kv_cache_tp_copies=kv_tp_copies(inp),
        kv_cache_bytes_all_gpus=kv_gpu * inp.gpus,
        kv_cache_to_weights_ratio=kv_total / (c.total * wb), free_bytes_per_gpu=free_for_kv - kv_gpu,
        max_batch_sequences=max(0, math.floor(free_for_kv / (w.context * kv_gpu_token))),
        fits=weights + kv_gpu <= mem,
    )
