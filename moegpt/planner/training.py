"""Training compute, time and cost: 6 x active parameters x tokens, at a given MFU or duration.

Legend: N GPUs, D training tokens, F training FLOPs, S sequence length, m micro-batches per replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.counts import ParamCounts, attention_flops_per_token
from moegpt.planner.inputs import PlanInputs
from moegpt.planner.memory import microbatches_per_replica, model_params_per_gpu

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Training:
    tokens: float | None
    global_batch_tokens: int
    total_flops: float | None  # 6 * active * D (or --train-flops)
    total_flops_with_attention: float | None  # + causal attention scores at S/2 keys on average
    mfu: float | None
    days: float | None
    gpu_hours: float | None
    cost_usd: float | None
    step_time_s: float | None
    steps: float | None
    microbatches_per_replica: int
    pipeline_bubble_fraction: float  # 1F1B: (pp - 1) / (m + pp - 1)
    dp_allreduce_s: float | None  # one ring all-reduce of this GPU's gradients over dp


def training(inp: PlanInputs, c: ParamCounts) -> Training:
    cfg, lay, w, opt = inp.model, inp.layout, inp.workload, inp.options
    N = inp.gpus
    peak = inp.hardware.peak_for(inp.precision.weight_bytes)
    # article: ~2.15e25 FLOPs = 6 x ~280B active x ~13T tokens; forward 2 + backward 4 per active parameter
    per_token = 6 * c.active_per_token
    tokens, flops = w.tokens, opt.train_flops
    if flops is not None:
        tokens = flops / per_token
    elif tokens is not None:
        flops = per_token * tokens
    # counts.py: causal attention sees S/2 keys on average; x3 for forward + backward
    attention = 3 * attention_flops_per_token(cfg, w.seq_len // 2)
    with_attention = None if flops is None else flops + tokens * attention
    mfu, days = inp.efficiency.mfu, inp.days
    seconds = None
    if flops is not None and mfu is not None:
        seconds = flops / (N * peak * mfu)
        days = seconds / SECONDS_PER_DAY
    elif flops is not None and days is not None:
        seconds = days * SECONDS_PER_DAY
        mfu = flops / (N * peak * seconds)
        if mfu > 1:
            raise ValueError(f"--days {days:g}: {flops:.3g} FLOPs on {N:g} GPUs in {days:g} days needs "
                             f"{mfu:.3g}x their peak {peak:.3g} FLOP/s (MFU over 100%)")
    gpu_hours = None if days is None else N * days * 24
    cost = None if gpu_hours is None or inp.gpu_hour_usd is None else gpu_hours * inp.gpu_hour_usd
    m = microbatches_per_replica(inp)
    if m < 1:
        raise ValueError(f"--batch-tokens {w.batch_tokens} gives each of dp={lay.dp:g} replicas less than one "
                         f"micro-batch of {lay.micro_batch} x {w.seq_len} tokens")
    # article: 15-way pipelining is "too much ... they probably just absorbed the cost" of the bubble
    bubble = (lay.pp - 1) / (m + lay.pp - 1)
    nic_bits = opt.nic_gbps_per_gpu * 1e9 if opt.nic_gbps_per_gpu is not None else inp.hardware.nic_bits_per_s_per_gpu
    allreduce = None
    if lay.dp > 1 and nic_bits is not None:
        grad_bytes = model_params_per_gpu(c, lay.tp, lay.pp, lay.ep) * inp.precision.weight_bytes
        allreduce = 2 * (lay.dp - 1) / lay.dp * grad_bytes / (nic_bits / 8)
    return Training(
        tokens=tokens, global_batch_tokens=w.batch_tokens, total_flops=flops,
        total_flops_with_attention=with_attention, mfu=mfu, days=days, gpu_hours=gpu_hours, cost_usd=cost,
        step_time_s=None if mfu is None else w.batch_tokens * per_token / (N * peak * mfu),
        steps=None if tokens is None else tokens / w.batch_tokens, microbatches_per_replica=m,
        pipeline_bubble_fraction=bubble, dp_allreduce_s=allreduce,
    )
