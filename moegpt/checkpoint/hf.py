"""HF Mixtral model directories: config.json <-> ModelConfig, and the one name-mapping table between
our parameter names and HF's.

A directory holds config.json (model_type "mixtral"), model.safetensors (or shards with
model.safetensors.index.json), tokenizer.json and generation_config.json. HF stores each expert's
matrices separately (w1 = gate, w3 = up, w2 = down); we stack them per layer as (E, out, in).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moegpt.config import MLPKind, ModelConfig, RopeScaling, RopeType

# Our name -> HF name, "{i}" for the layer. Expert weights are handled by EXPERT_NAMES.
NAME_MAP: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.ffn.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
}
# Our stacked expert tensor -> HF per-expert name, "{e}" for the expert.
EXPERT_NAMES: dict[str, str] = {
    "layers.{i}.ffn.experts.w_gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{i}.ffn.experts.w_down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "layers.{i}.ffn.experts.w_up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.")


def mixtral_incompatibility(cfg: ModelConfig) -> str | None:
    """Why Mixtral's format cannot express this shape, or None when it can."""
    if cfg.mlp != MLPKind.SWIGLU:
        return f"mlp={cfg.mlp.value} experts (Mixtral experts are SwiGLU)"
    if cfg.moe_every != 1:
        return f"moe_every={cfg.moe_every} dense layers (every Mixtral layer is MoE)"
    return None  # a capacity factor is a training-time limit: saved models route every token, as Mixtral


def config_to_hf(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    reason = mixtral_incompatibility(cfg)
    if reason is not None:
        raise ValueError(f"cannot save as an HF Mixtral directory: {reason}")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta (and rope_scaling), 5.x reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        **rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def rope_to_hf(cfg: ModelConfig) -> dict:
    """max_position_embeddings and rope_parameters (plus the legacy rope_scaling) as transformers 5
    reads them. A dynamic scaling's max_position_embeddings is its original context: transformers
    grows the base past it."""
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"max_position_embeddings": cfg.max_seq_len,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    params = {"rope_type": scaling.type.value, "rope_theta": cfg.rope_theta, "factor": float(scaling.factor)}
    out = {"max_position_embeddings": cfg.max_seq_len}
    if scaling.type == RopeType.YARN:
        params.update(original_max_position_embeddings=scaling.original_max_seq_len,
                      beta_fast=float(scaling.beta_fast), beta_slow=float(scaling.beta_slow), truncate=scaling.truncate)
        if scaling.attention_factor is not None:
            params["attention_factor"] = float(scaling.attention_factor)
    elif scaling.type == RopeType.DYNAMIC:
        out["max_position_embeddings"] = scaling.original_max_seq_len
    elif scaling.original_max_seq_len is not None:  # linear: transformers ignores it; kept beside, as Phi-3 does
        out["original_max_position_embeddings"] = scaling.original_max_seq_len
    legacy = {"type": params["rope_type"], **{k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}}
    return {**out, "rope_parameters": params, "rope_scaling": legacy}


_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "truncate", "partial_rotary_factor"}


def rope_from_hf(d: dict, where: str) -> tuple[float, RopeScaling | None, int]:
    """(rope_theta, scaling, max_seq_len) of an HF config: transformers 5's rope_parameters, else the
    legacy rope_scaling (transformers 4) beside a top-level rope_theta."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", d.get("rope_theta", 1e6)))
    max_len = d.get("max_position_embeddings", 4096)
    if kind == "default":
        return theta, None, max_len
    if kind not in [t.value for t in RopeType]:
        raise ValueError(f"{where}: rope_type={kind!r} is not supported (default, linear, dynamic or yarn)")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"{where}: {kind} rope parameters {unknown} are not supported")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={params['partial_rotary_factor']!r} is not supported")
    factor = params.get("factor")
    if kind == "yarn" and factor is None and params.get("original_max_position_embeddings"):
        factor = max_len / params["original_max_position_embeddings"]
    original = params.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if kind == "dynamic":  # transformers' dynamic base grows past max_position_embeddings
        original = max_len
        max_len = round(max_len * factor) if isinstance(factor, (int, float)) else max_len
    elif kind == "yarn" and original is None:
        original = max_len
    fields = {k: params[k] for k in ("beta_fast", "beta_slow", "attention_factor", "truncate") if params.get(k) is not None}
    try:
        scaling = RopeScaling(type=kind, factor=factor, original_max_seq_len=original, **fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return theta, scaling, max_len


def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    if d.get("model_type") != "mixtral":
        raise ValueError(f"{where}: model_type={d.get('model_type')!r}, expected 'mixtral'")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={d['hidden_act']!r}, only 'silu' Mixtral experts are supported")
    if d.get("sliding_window") not in (None, 0) and d["sliding_window"] < d.get("max_position_embeddings", 0):
        raise ValueError(f"{where}: sliding_window={d['sliding_window']} is not supported")
    theta, scaling, max_len = rope_from_hf(d, where)
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), d_ff=d["intermediate_size"], mlp=MLPKind.SWIGLU,
            n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"], moe_every=1,
            rope_theta=theta, rope_scaling=scaling, max_seq_len=max_len,
            norm_eps=d.get("rms_norm_eps", 1e-5), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF Mixtral tensor names (experts unstacked)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        i = m.group(1) if m else None
        template = _LAYER.sub("layers.{i}.", name)
        if template in NAME_MAP:
            out[NAME_MAP[template].format(i=i)] = t.contiguous()
        elif template in EXPERT_NAMES:
            for e in range(t.shape[0]):
                out[EXPERT_NAMES[template].format(i=i, e=e)] = t[e].contiguous()
        else:
            raise KeyError(f"no HF name for parameter {name!r}")
    return out


def unfuse_experts(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """transformers 5 can also save experts fused, ``mlp.experts.gate_up_proj`` (E, 2F, D) with the
    gate rows first and ``mlp.experts.down_proj`` (E, D, F), and the router as ``mlp.gate``. Rewrite
    such tensors in place under the per-expert names of NAME_MAP / EXPERT_NAMES."""
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}.mlp."
        if prefix + "experts.gate_up_proj" not in hf:
            continue
        gate_up, down = hf.pop(prefix + "experts.gate_up_proj"), hf.pop(prefix + "experts.down_proj")
        gate, up = gate_up.chunk(2, dim=1)  # (E, F, D) each
        for e in range(gate_up.shape[0]):
            for ours, theirs in EXPERT_NAMES.items():
                part = {"w_gate": gate, "w_up": up, "w_down": down}[ours.rsplit(".", 1)[1]]
                hf[theirs.format(i=i, e=e)] = part[e]
        if prefix + "gate.weight" in hf:
            hf[NAME_MAP["layers.{i}.ffn.router.weight"].format(i=i)] = hf.pop(prefix + "gate.weight")


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Mixtral tensors -> our state dict; every expected tensor must be present. Consumes ``hf``
    (tensors are popped as they are used, so peak memory stays near one copy)."""
    unfuse_experts(hf, cfg)
    out: dict[str, torch.Tensor] = {}

    def take(hf_name: str) -> torch.Tensor:
        if hf_name not in hf:
            raise ValueError(f"checkpoint is missing tensor {hf_name!r}")
        return hf.pop(hf_name)

    for ours, theirs in NAME_MAP.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        layers = range(cfg.n_layers) if "{i}" in ours else [None]
        for i in layers:
            out[ours.format(i=i)] = take(theirs.format(i=i))
    for ours, theirs in EXPERT_NAMES.items():
        for i in range(cfg.n_layers):
            out[ours.format(i=i)] = torch.stack([take(theirs.format(i=i, e=e)) for e in range(cfg.n_experts)])
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some writers store the tied head anyway
    unused = sorted(hf)
    if unused:
        raise ValueError(f"checkpoint has {len(unused)} unexpected tensor(s), e.g. {unused[0]!r}")
    return out


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    try:
        if single.exists():
            return load_file(single)
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(load_file(directory / shard))
            return tensors
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(f"{directory}: cannot read weights ({type(e).__name__}: {e})") from None
    raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")
