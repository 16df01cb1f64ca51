"""Pure arithmetic on a ModelConfig: parameters, FLOPs per token, KV-cache bytes.

One formula, used everywhere: the model's tests check it against ``sum(p.numel())`` of every preset
built on the meta device, the trainer's MFU divides by it, and the planner builds on it.

Legend: L layers, D d_model, H query heads, G kv heads, Dh head dim, F d_ff per expert,
E experts, K top-k, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moegpt.config import MLPKind, ModelConfig


def mlp_params(d_model: int, d_ff: int, kind: MLPKind) -> int:
    """Parameters of one feed-forward block (one expert): 3 matrices for SwiGLU, 2 for GELU."""
    matrices = 3 if kind == MLPKind.SWIGLU else 2
    return matrices * d_model * d_ff


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active_per_token: int  # what one token touches: shared weights + top-k experts
    attention: int  # q, k, v, o over all layers
    embedding: int  # input embedding + LM head (once when tied)
    per_expert: int  # one expert's MLP, summed over the MoE layers (the article's ~111B)
    experts_total: int  # all experts of all MoE layers
    dense_mlp: int  # MLPs of dense (non-MoE) layers
    router: int
    norms: int

    @property
    def shared(self) -> int:
        """Parameters every token uses: all but the experts."""
        return self.total - self.experts_total

    def to_dict(self) -> dict:
        return {**asdict(self), "shared": self.shared}


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, L, E, K = cfg.d_model, cfg.n_layers, cfg.n_experts, cfg.top_k
    attention = L * (D * cfg.q_dim * 2 + D * cfg.kv_dim * 2)  # wq, wo; wk, wv
    one_mlp = mlp_params(D, cfg.d_ff, cfg.mlp)
    n_moe = cfg.n_moe_layers
    per_expert = n_moe * one_mlp
    experts_total = E * per_expert
    dense_mlp = (L - n_moe) * one_mlp
    router = n_moe * D * E
    norms = (2 * L + 1) * D
    embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    total = attention + experts_total + dense_mlp + router + norms + embedding
    active = total - experts_total + K * per_expert
    return ParamCounts(
        total=total, active_per_token=active, attention=attention, embedding=embedding,
        per_expert=per_expert, experts_total=experts_total, dense_mlp=dense_mlp, router=router,
        norms=norms,
    )


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Active parameters that take part in a matmul: the input embedding is a lookup and norms are
    elementwise, so neither costs 2 FLOPs per parameter (the LM head does, tied or not)."""
    c = param_counts(cfg)
    lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return c.active_per_token - lookup - c.norms


def attention_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Score and value FLOPs of one token attending to ``context`` keys: 2 matmuls x 2 FLOPs."""
    return 4 * cfg.n_layers * context * cfg.q_dim


def forward_flops_per_token(cfg: ModelConfig, context: int = 0) -> int:
    """Forward FLOPs per token: 2 per active matmul parameter plus attention at ``context``."""
    return 2 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, context)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward (3x forward). Causal attention: a token sees seq_len/2 keys on average."""
    return 3 * forward_flops_per_token(cfg, context=seq_len // 2)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """K and V for every layer: with MQA (G=1) this is H times smaller than multi-head."""
    return 2 * cfg.n_layers * cfg.kv_dim * bytes_per_value
