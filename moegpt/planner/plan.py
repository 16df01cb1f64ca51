"""plan(inputs) -> Plan: the whole arithmetic, as nested frozen dataclasses matching the JSON.

Parameters come from counts.py; FLOPs are counted as 2 x active parameters per token (6 in training),
with attention-score FLOPs reported separately. Every section appears in both modes; fields that do
not apply to the mode are None (JSON null). Units: counts, FLOP, bytes, bytes/s, seconds, USD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass

from moegpt.counts import (attention_flops_per_token, cross_attention_flops_per_token, image_flops, param_counts,
                           vision_param_counts)
from moegpt.planner.decode import MoE, Decode, Roofline, StepReads, decode, moe_for_training
from moegpt.planner.inputs import PlanInputs
from moegpt.planner.memory import Memory, memory
from moegpt.planner.training import Training, training
from moegpt.vision_config import VisionConfig

SCHEMA_VERSION = "1.1"  # 1.1: the vision section
BUBBLE_WARNING = 0.1  # a pipeline idle more than 10% of each step


@dataclass(frozen=True)
class Model:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    gated_mlp: bool
    n_experts: int
    top_k: int
    vocab_size: int
    tied_embeddings: bool


@dataclass(frozen=True, kw_only=True)
class Params:
    total: int
    active_per_token: int
    shared: int
    attention: int
    embedding: int
    per_expert_mlp: int  # one expert summed over the MoE layers (the article's ~111B)
    experts_total: int
    router: int


@dataclass(frozen=True)
class Flops:
    forward_per_token: int  # 2 * active
    forward_per_token_dense: int  # 2 * total: a dense model of the same size
    attention_per_token_at_context: int  # 4 * L * context * d_attn
    train_per_token: int  # 6 * active


@dataclass(frozen=True)
class Parallelism:
    gpus: float
    tp: int
    pp: int
    dp: float
    ep: int
    nodes: int
    layers_per_stage: float  # L / pp (fractional when pp does not divide L)


@dataclass(frozen=True)
class InferenceCost:
    usd_per_1k_tokens: float | None
    gpu_hour_usd: float | None
    cluster_tokens_per_s: float
    implied_mfu: float


@dataclass(frozen=True)
class Derived:
    reading_speed_tok_s: float | None
    params_ratio_vs_gpt3: float
    active_params_ratio_vs_davinci: float
    train_compute_ratio_vs_gpt3: float | None
    chinchilla_token_multiple: float | None  # tokens a compute-optimal run wants / tokens used
    vision_io_ratio: float | None


@dataclass(frozen=True)
class Vision:
    """A Flamingo-style image side (issue 15; beyond PLANNER.md's sections): its parameters, the
    FLOPs to encode one image, and a text token's FLOPs in the gated cross-attention blocks."""

    tower_params: int
    resampler_params: int
    cross_attention_params: int
    added_params: int
    cross_attention_layers: int  # gated blocks
    tokens_per_image: int  # the resampler's latents each text token may attend to
    flops_per_image: int
    cross_attention_flops_per_token: int


@dataclass(frozen=True)
class PlanWarning:
    code: str
    message: str


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    model: Model
    params: Params
    flops: Flops
    parallelism: Parallelism
    memory: Memory
    moe: MoE
    roofline: Roofline | None  # inference only
    decode: Decode | None  # inference only
    training: Training | None  # training only
    inference_cost: InferenceCost | None  # inference only
    derived: Derived
    vision: Vision | None  # with an image side only
    warnings: tuple[PlanWarning, ...]
    reads: StepReads | None  # inference only; not a PLANNER.md field (the table shows it)

    def to_dict(self) -> dict:
        """The JSON object of PLANNER.md: every section present, null fields where not applicable."""
        out: dict = {"schema_version": SCHEMA_VERSION, "inputs": self.inputs.to_dict(),
                     "hardware": self.inputs.hardware.to_dict()}
        nulls = {"roofline": Roofline, "decode": Decode, "training": Training, "inference_cost": InferenceCost,
                 "vision": Vision}
        for f in fields(self):
            if f.name in ("inputs", "warnings", "reads"):
                continue
            value = getattr(self, f.name)
            out[f.name] = asdict(value) if is_dataclass(value) else {g.name: None for g in fields(nulls[f.name])}
        out["warnings"] = [asdict(w) for w in self.warnings]
        return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _integral(x: float) -> float:
    return int(x) if float(x).is_integer() else x


def plan(inp: PlanInputs) -> Plan:
    cfg, lay, w, opt = inp.model, inp.layout, inp.workload, inp.options
    c = param_counts(cfg)
    active = c.active_per_token
    model = Model(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, d_ff=cfg.d_ff, gated_mlp=cfg.mlp.value == "swiglu",
                  n_experts=cfg.n_experts, top_k=cfg.top_k, vocab_size=cfg.vocab_size,
                  tied_embeddings=cfg.tie_embeddings)
    params = Params(total=c.total, active_per_token=active, shared=c.shared, attention=c.attention,
                    embedding=c.embedding, per_expert_mlp=c.per_expert, experts_total=c.experts_total,
                    router=c.router)
    flops = Flops(forward_per_token=2 * active, forward_per_token_dense=2 * c.total,
                  attention_per_token_at_context=attention_flops_per_token(cfg, w.context),
                  train_per_token=6 * active)
    par = Parallelism(gpus=_integral(inp.gpus), tp=lay.tp, pp=lay.pp, dp=lay.dp, ep=lay.ep,
                      nodes=math.ceil(inp.gpus / inp.hardware.gpus_per_nvlink_domain),
                      layers_per_stage=_integral(cfg.n_layers / lay.pp))
    mem = memory(inp, c)
    peak = inp.hardware.peak_for(inp.precision.weight_bytes)
    roof = dec = train = cost = reads = None
    if inp.mode == "train":
        moe = moe_for_training(inp)
        train = training(inp, c)
    else:
        moe, roof, dec, reads = decode(inp, c)
        tps = dec.cluster_tokens_per_s
        # article: cost per 1k tokens = GPUs x $/h / 3600 / tokens per s x 1000 ("assuming high utilisation")
        if inp.efficiency.mfu is not None:  # a given MFU fixes the throughput instead of the roofline
            tps = inp.efficiency.mfu * inp.gpus * peak / (2 * active)
        usd = None if inp.gpu_hour_usd is None else inp.gpus * inp.gpu_hour_usd / 3600 / tps * 1000
        cost = InferenceCost(usd_per_1k_tokens=usd, gpu_hour_usd=inp.gpu_hour_usd, cluster_tokens_per_s=tps,
                             implied_mfu=tps * 2 * active / (inp.gpus * peak))
    # article: 250 words/min -> 8.33 tokens/s (it takes 2 tokens per word)
    reading = None if opt.words_per_min is None else opt.words_per_min / 60 * opt.tokens_per_word
    ref = param_counts(inp.compare_model)
    train_flops = None if train is None else train.total_flops
    tokens = None if train is None else train.tokens
    derived = Derived(
        reading_speed_tok_s=reading, params_ratio_vs_gpt3=c.total / ref.total,
        active_params_ratio_vs_davinci=active / ref.active_per_token,
        train_compute_ratio_vs_gpt3=None if train_flops is None or opt.compare_tokens is None
        else train_flops / (6 * ref.active_per_token * opt.compare_tokens),
        chinchilla_token_multiple=None if tokens is None else opt.tokens_per_param * c.total / tokens,
        vision_io_ratio=None if opt.bytes_per_token_text is None or opt.bytes_per_token_vision is None
        else opt.bytes_per_token_vision / opt.bytes_per_token_text,
    )
    return Plan(inputs=inp, model=model, params=params, flops=flops, parallelism=par, memory=mem, moe=moe,
                roofline=roof, decode=dec, training=train, inference_cost=cost, derived=derived,
                vision=None if inp.vision is None else vision(inp.vision),
                warnings=tuple(warnings(inp, mem, dec, train, reading)), reads=reads)


def vision(v: VisionConfig) -> Vision:
    counts = vision_param_counts(v)
    return Vision(tower_params=counts.tower, resampler_params=counts.resampler,
                  cross_attention_params=counts.cross_attention, added_params=counts.added,
                  cross_attention_layers=len(v.cross_attention_layers), tokens_per_image=v.n_latents,
                  flops_per_image=image_flops(v), cross_attention_flops_per_token=cross_attention_flops_per_token(v))


def warnings(inp: PlanInputs, mem: Memory, dec: Decode | None, train: Training | None,
             reading: float | None) -> list[PlanWarning]:
    cfg, lay = inp.model, inp.layout
    gb = 1e9
    out = []
    if not float(lay.dp).is_integer():
        out.append(PlanWarning("NON_INTEGER_DP", f"gpus {inp.gpus:g} / (tp {lay.tp} * pp {lay.pp}) = dp {lay.dp:.2f}"))
    if cfg.n_kv_heads > lay.tp and cfg.n_kv_heads % lay.tp:
        out.append(PlanWarning("HEADS_NOT_DIVISIBLE_BY_TP", f"{cfg.n_kv_heads} KV heads over tp {lay.tp}: "
                           f"ranks hold {math.ceil(cfg.n_kv_heads / lay.tp)} (rounded up)"))
    if lay.tp > cfg.n_kv_heads and lay.kv_sharding == "replicated" and inp.mode == "inference":
        out.append(PlanWarning("KV_HEAD_REPLICATED", f"{cfg.n_kv_heads} KV head(s) copied onto each of {lay.tp} TP "
                           f"ranks (--kv-sharding batch splits sequences instead)"))
    if inp.mode == "inference" and mem.weights_bytes_per_gpu > inp.hardware.mem_bytes:
        out.append(PlanWarning("KV_DOES_NOT_FIT", f"the weights alone, {mem.weights_bytes_per_gpu / gb:.1f} GB per "
                               f"GPU, exceed {inp.hardware.mem_bytes / gb:.0f} GB: raise tp or pp"))
    elif inp.mode == "inference" and not mem.fits:
        out.append(PlanWarning("KV_DOES_NOT_FIT", f"weights {mem.weights_bytes_per_gpu / gb:.1f} GB + KV "
                           f"{mem.kv_cache_bytes_per_gpu / gb:.1f} GB per GPU > {inp.hardware.mem_bytes / gb:.0f} GB; "
                           f"at most {mem.max_batch_sequences} sequences of {inp.workload.context} tokens fit"))
    if inp.mode == "train" and not mem.fits:
        state = mem.training_state_bytes_per_gpu / gb
        out.append(PlanWarning("TRAIN_STATE_DOES_NOT_FIT", f"training state {state:.1f} "
                           f"GB per GPU > {inp.hardware.mem_bytes / gb:.0f} GB (zero stage {lay.zero_stage})"))
    speed = [(s, label) for s, label in ((reading, "reading speed"), (inp.options.target_tps, "--target-tps"))
             if s is not None]
    for s, label in speed:
        if dec is not None and dec.tokens_per_s_per_user < s:
            out.append(PlanWarning("READING_SPEED", f"{dec.tokens_per_s_per_user:.2f} tokens/s per user is below "
                               f"the {label} of {s:.2f} tokens/s"))
    m = inp.options.measured_efficiency
    if m is not None:  # a note: where hbm_efficiency came from (--measure-efficiency)
        capped = f" (measured {m.eta:.3g}, capped at 1)" if m.eta > 1 else ""
        out.append(PlanWarning("MEASURED_EFFICIENCY", f"hbm_efficiency {m.hbm_efficiency:.3g}{capped} measured on "
                               f"this machine = roofline memory time {_ms(m.t_roofline_mem_s)} / measured reads "
                               f"{_ms(m.t_matmul_s + m.t_kv_s)} (t_matmul {_ms(m.t_matmul_s)}: weight products at "
                               f"the model's shapes, cold; t_kv {_ms(m.t_kv_s)}); the stage time adds t_software "
                               f"{_ms(m.t_software_s)} (the engine's step at tiny widths)"))
    if train is not None and train.pipeline_bubble_fraction > BUBBLE_WARNING:
        out.append(PlanWarning("PIPELINE_BUBBLE_HIGH", f"1F1B bubble {train.pipeline_bubble_fraction:.0%} with pp "
                           f"{lay.pp} and {train.microbatches_per_replica} micro-batches per replica"))
    return out
