"""The planner's model presets: the model presets plus the shapes the article reasons about.

Every preset is a plain ModelConfig, so counts.py gives its parameters and FLOPs. The GPT-4 variants
are shapes fitted to the article's 1.8T total / ~55B attention / ~111B per expert (PLANNER.md). The
dense reference models are dense in the model's own terms: ``moe_every`` past the last layer, so every
layer has a plain MLP, with no router and no experts (what build_model makes of them too). counts.py
has no biases or learned position embeddings, so davinci comes to 174.6B (GPT-3's "175B" rounds the
same 12*L*d^2 + embedding count; its biases and positions add ~0.04B).
"""

from __future__ import annotations

from moegpt.config import PRESETS, MLPKind, ModelConfig

GPT3_VOCAB = 50_257  # GPT-2/3 BPE

_GPT4 = PRESETS["gpt4"]  # article: 120 layers, 16 experts, top-2, MQA, 8k pre-training context


def dense(**shape) -> ModelConfig:
    """A dense model: no layer is an MoE layer (``moe_every`` is past the last one)."""
    return ModelConfig(n_experts=1, top_k=1, moe_every=shape["n_layers"] + 1, **shape)


def reshaped(cfg: ModelConfig, **overrides) -> ModelConfig:
    """``cfg.replace(**overrides)``, keeping a dense model dense when its depth changes."""
    if cfg.n_moe_layers == 0 and "moe_every" not in overrides:
        overrides["moe_every"] = overrides.get("n_layers", cfg.n_layers) + 1
    return cfg.replace(**overrides)


PLANNER_PRESETS: dict[str, ModelConfig] = {
    **PRESETS,
    # Multi-head attention with a GPT-3-shaped expert (d_ff = 4d); same 1.83T total.
    "gpt4-mha": _GPT4.replace(d_model=10_752, n_heads=96, head_dim=112, n_kv_heads=96, d_ff=43_008),
    # Grouped-query attention with SwiGLU experts (Mixtral-shaped).
    "gpt4-gqa": _GPT4.replace(d_model=14_336, n_heads=112, head_dim=128, n_kv_heads=8, d_ff=21_504,
                              mlp=MLPKind.SWIGLU),
    # The article's "dense model with a trillion parameters" (its bandwidth chart): ~1.01T.
    "dense-1t": dense(
        vocab_size=GPT3_VOCAB, d_model=25_600, n_layers=128, n_heads=160, n_kv_heads=160, d_ff=102_400,
        mlp=MLPKind.GELU, max_seq_len=2048,
    ),
    # The article's "500B+ model with multi-head attention" (from the PaLM inference paper): PaLM
    # 540B's shape, but with 48 KV heads instead of PaLM's single one.
    "palm540b-mha": dense(
        vocab_size=256_000, d_model=18_432, n_layers=118, n_heads=48, n_kv_heads=48, head_dim=256,
        d_ff=73_728, mlp=MLPKind.SWIGLU, max_seq_len=2048, tie_embeddings=True,
    ),
    # GPT-3 175B ("Davinci"): the article's yardstick for GPT-4's size and cost.
    "davinci": dense(
        vocab_size=GPT3_VOCAB, d_model=12_288, n_layers=96, n_heads=96, n_kv_heads=96, d_ff=49_152,
        mlp=MLPKind.GELU, max_seq_len=2048, tie_embeddings=True,
    ),
}


def planner_preset(name: str) -> ModelConfig:
    try:
        return PLANNER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PLANNER_PRESETS)}") from None


def with_total_params(cfg: ModelConfig, target: float) -> ModelConfig:
    """``--params N``: the preset's shape with the layer count that brings its total nearest ``N``.

    The width, heads and experts stay; only depth moves, so every count still comes from a shape."""
    from moegpt.counts import param_counts

    if target <= 0:
        raise ValueError(f"--params {target:g} must be positive")
    one = param_counts(reshaped(cfg, n_layers=1)).total
    per_layer = param_counts(reshaped(cfg, n_layers=2)).total - one
    layers = max(1, round((target - (one - per_layer)) / per_layer))
    return reshaped(cfg, n_layers=layers)
