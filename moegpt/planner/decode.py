"""The reference decode algorithm (PLANNER.md): a bandwidth/compute roofline across a TP x PP cluster.

Legend: B batch (sequences per replica), b tokens per micro-batch, E experts, k top-k, f fraction of
experts one micro-batch reads, C context, L layers, D d_model, w weight bytes, N GPUs.

1. n_micro = min(pp, B) micro-batches of b = B/n_micro tokens; uniform top-k routing reads
   f = 1 - (1 - k/E)^b of the experts per micro-batch.
2. t_mem  = [(shared + f*experts)/(tp*pp) * w * overhead + b*C*KV_per_token_per_GPU] / (HBM*eta_hbm)
3. t_comp = b * [2*active/pp + 4*(L/pp)*C*d_attn] / tp / (peak*eta_flops)
4. t_comm = (L/pp) layers x 2 all-reduces x 2(tp-1)/tp x b*D*2 bytes / (NVLink/2)
5. t_stage = max(t_mem, t_comp) + t_comm;  per user 1/(pp*t_stage);  cluster dp*B/(pp*t_stage)
Refinement (``embedding_lookup``; on by default for ``--hardware local``, whose purpose is to predict
our engine): an untied input embedding is a lookup, not a matmul, so a micro-batch reads b of its V
rows, not the whole V x D matrix the reference algorithm counts in "shared", and costs no FLOPs
(compute counts 2 per *matmul* parameter, counts.matmul_params_per_token; the LM head is a matmul
and is read whole either way). Negligible for GPT-4 (1.5B of 1.8T); ~20% of the bytes at batch 1
for the 0.5B ``small`` model.
Refinement (ep > 1): ep replicas share their experts, so a GPU's experts see the b*ep tokens of
ep micro-batches and it holds experts/ep of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.counts import ParamCounts, matmul_params_per_token
from moegpt.planner.inputs import PlanInputs
from moegpt.planner.memory import kv_bytes_per_token_per_gpu

ACT_BYTES = 2  # the all-reduced activations are BF16


@dataclass(frozen=True)
class MoE:
    """Expert batching; every field None for a dense model (no MoE layer: nothing to route)."""

    tokens_per_expert: float | None  # B*k/E (training: global batch tokens)
    tokens_per_expert_per_weight_read: float | None  # (B/n_micro)*k/E: what one read of an expert serves
    expected_experts_touched: float | None  # E*(1-(1-k/E)^b)
    expert_weight_fraction_read: float | None


NO_MOE = MoE(None, None, None, None)


@dataclass(frozen=True)
class Roofline:
    flops_per_param_per_token: int
    arithmetic_intensity_per_param: float  # FLOP per parameter read, 2B
    tokens_per_weight_read: float
    arithmetic_intensity_flop_per_byte_shared: float
    arithmetic_intensity_flop_per_byte_expert: float | None  # None for a dense model
    ridge_flop_per_byte: float  # at the precision in use
    bound: str  # "memory" or "compute"


@dataclass(frozen=True)
class StepReads:
    """Bytes one GPU reads from memory per pipeline stage step (one micro-batch of b tokens): the
    ``t_mem`` numerator. Not a PLANNER.md field; the table prints it so a prediction can be checked."""

    weight_bytes: float  # shared weights + the experts the micro-batch touches (x overhead factor)
    kv_bytes: float  # b sequences' K and V over the context, for this GPU's layers


@dataclass(frozen=True)
class Decode:
    stage_time_s: float
    t_mem_s: float
    t_compute_s: float
    t_comm_s: float
    per_token_latency_s: float
    tokens_per_s_per_user: float
    cluster_tokens_per_s: float
    mfu: float
    mfu_at_target_tps: float | None
    bandwidth_required_bytes_per_s: float | None
    max_params_for_target_tps: float | None
    speculative_tokens_per_pass: float | None


def experts_read_fraction(tokens: float, k: int, E: int) -> float:
    """Expected fraction of E experts that ``tokens`` tokens, each routed uniformly to k, touch."""
    return 1 - (1 - k / E) ** tokens


def embedding_rows_not_read(cfg, tokens: float) -> float:
    """Parameters of an untied input embedding that ``tokens`` lookups do not read (0 when tied: the
    matrix is the LM head too, which reads all of it)."""
    if cfg.tie_embeddings:
        return 0.0
    return max(cfg.vocab_size - tokens, 0) * cfg.d_model


def speculative_tokens_per_pass(draft_tokens: int, acceptance: float) -> float:
    """Expected tokens one verifying pass yields (Leviathan et al. 2023): (1 - a^(g+1)) / (1 - a)."""
    if acceptance >= 1:
        return draft_tokens + 1
    return (1 - acceptance ** (draft_tokens + 1)) / (1 - acceptance)


def moe_for_training(inp: PlanInputs) -> MoE:
    cfg, w = inp.model, inp.workload
    k, E = cfg.top_k, cfg.n_experts
    per_read = inp.layout.micro_batch * w.seq_len  # tokens of one micro-batch
    f = experts_read_fraction(per_read, k, E)
    if cfg.n_moe_layers == 0:
        return NO_MOE
    return MoE(tokens_per_expert=w.batch_tokens * k / E, tokens_per_expert_per_weight_read=per_read * k / E,
               expected_experts_touched=E * f, expert_weight_fraction_read=f)


def decode(inp: PlanInputs, c: ParamCounts) -> tuple[MoE, Roofline, Decode, StepReads]:
    cfg, lay, hw, w, eff, opt = inp.model, inp.layout, inp.hardware, inp.workload, inp.efficiency, inp.options
    tp, pp, ep, B, C = lay.tp, lay.pp, lay.ep, w.batch, w.context
    k, E = cfg.top_k, cfg.n_experts
    wb = inp.precision.weight_bytes
    peak = hw.peak_for(wb)
    # 1. pipeline set-up: every stage works on one of n_micro micro-batches at a time
    n_micro = min(pp, B)
    b = B / n_micro
    f = experts_read_fraction(b * ep, k, E)  # article: batch 8, top-2 of 16 -> an expert may see 1 token
    # 2. memory: this GPU's share of the weights read once per micro-batch, plus its KV for b sequences
    # article: "every parameter must be read ... and the KV cache needs extra bandwidth to stream"
    shared_read = c.shared - (embedding_rows_not_read(cfg, b) if opt.embedding_lookup else 0)
    weight_bytes = (shared_read + f * c.experts_total / ep) / (tp * pp) * wb * eff.overhead_factor
    kv_bytes = b * C * kv_bytes_per_token_per_gpu(inp)
    t_mem = (weight_bytes + kv_bytes) / (hw.hbm_bytes_per_s * eff.hbm_efficiency)
    # 3. compute: 2 FLOPs per active parameter + attention over the context, split over TP
    layers = cfg.n_layers / pp
    per_token = matmul_params_per_token(cfg) if opt.embedding_lookup else c.active_per_token
    flops = b * (2 * per_token / pp + 4 * layers * C * cfg.q_dim) / tp
    t_comp = flops / (peak * eff.flops_efficiency)
    # 4. TP: two all-reduces of b x D activations per layer (after attention, after the MLP), ring
    t_comm = 0.0
    if tp > 1:
        if hw.nvlink_bytes_per_s is None:
            raise ValueError(f"--tp {tp}: {hw.name} has no NVLink figure")
        t_comm = layers * 2 * 2 * (tp - 1) / tp * b * cfg.d_model * ACT_BYTES / (hw.nvlink_bytes_per_s / 2)
    # 5-7. stage time; a user's token crosses all pp stages (unlike llm-analysis, which reports one stage).
    # Refinement (--measure-efficiency): plus the engine's measured software time per step.
    t_software = 0.0 if opt.measured_efficiency is None else opt.measured_efficiency.t_software_s
    t_stage = max(t_mem, t_comp) + t_comm + t_software
    latency = pp * t_stage
    cluster_tps = lay.dp * B / latency
    flops_per_token = 2 * c.active_per_token
    mfu = cluster_tps * flops_per_token / (inp.gpus * peak)
    target = opt.target_tps
    aggregate_hbm = tp * pp * hw.hbm_bytes_per_s  # one replica
    moe = NO_MOE if cfg.n_moe_layers == 0 else MoE(
        tokens_per_expert=B * k / E, tokens_per_expert_per_weight_read=b * k / E,
        expected_experts_touched=E * f, expert_weight_fraction_read=f)
    roof = Roofline(
        flops_per_param_per_token=2, arithmetic_intensity_per_param=2 * B, tokens_per_weight_read=b,
        arithmetic_intensity_flop_per_byte_shared=2 * b / wb,
        # tokens per expert actually read: b*ep*k / (E*f)
        arithmetic_intensity_flop_per_byte_expert=None if moe is NO_MOE else 2 * (b * ep * k / (E * f)) / wb,
        ridge_flop_per_byte=peak / hw.hbm_bytes_per_s, bound="compute" if t_comp > t_mem else "memory",
    )
    dec = Decode(
        stage_time_s=t_stage, t_mem_s=t_mem, t_compute_s=t_comp, t_comm_s=t_comm, per_token_latency_s=latency,
        tokens_per_s_per_user=1 / latency, cluster_tokens_per_s=cluster_tps, mfu=mfu,
        mfu_at_target_tps=None if target is None else target * lay.dp * B * flops_per_token / (inp.gpus * peak),
        # the HBM bandwidth (summed over the replica's GPUs) that the memory term alone needs for the
        # target per-user speed; stages take turns, so a token needs pp stage-reads in 1/target s
        bandwidth_required_bytes_per_s=None if target is None else (weight_bytes + kv_bytes) * tp * pp * pp * target,
        # the largest model (all weights read per token, KV ignored) this replica streams at the target
        max_params_for_target_tps=None if target is None else
        aggregate_hbm * eff.hbm_efficiency / (pp * wb * eff.overhead_factor * target),
        speculative_tokens_per_pass=None if opt.draft_tokens is None else
        speculative_tokens_per_pass(opt.draft_tokens, opt.acceptance_rate),
    )
    return moe, roof, dec, StepReads(weight_bytes=weight_bytes, kv_bytes=kv_bytes)
