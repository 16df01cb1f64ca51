"""Pure arithmetic on a ModelConfig: parameters, FLOPs per token, KV-cache bytes.

One formula, used everywhere: the model's tests check it against ``sum(p.numel())`` of every preset
built on the meta device, the trainer's MFU divides by it, and the planner builds on it.

Legend: L layers, D d_model, H query heads, G kv heads, Dh head dim, F d_ff per expert,
E experts, K top-k, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moegpt.config import MLPKind, ModelConfig
from moegpt.vision_config import TowerConfig, TowerKind, VisionConfig


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


KV_SCALE_BYTES = 4  # an 8-bit KV cache's fp32 scale per token, kv head and K or V (moegpt/infer/kv_quant.py)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2, scale_bytes: int = 0) -> int:
    """K and V for every layer: with MQA (G=1) this is H times smaller than multi-head. scale_bytes:
    per kv head of K (and of V), as an 8-bit cache stores (moegpt/infer/kv_quant.py: 4)."""
    return 2 * cfg.n_layers * (cfg.kv_dim * bytes_per_value + cfg.n_kv_heads * scale_bytes)


# ---- vision (Flamingo-style: tower -> resampler -> gated cross-attention) ---------------------------
# Legend: Dv tower width, Fv tower MLP width, S positions per image, P patch, C channels, Lt tower
# layers, R resampler layers, Lq latents, Hr x Dr resampler heads, Hx x Dx cross-attention heads, m ff_mult.


def tower_param_counts(t: TowerConfig) -> int:
    D, F = t.hidden_size, t.intermediate_size
    clip = t.kind == TowerKind.CLIP
    mlp = 2 * D * F + F + D
    block = 4 * D + 4 * (D * D + D) + mlp  # 2 LayerNorms, q/k/v/o with biases, the MLP
    embeddings = t.num_channels * t.patch_size ** 2 * D + (0 if clip else D) + t.n_positions * D + (D if clip else 0)
    head = (D + 3 * D * D + 3 * D + D * D + D + 2 * D + mlp) if t.use_head else 0  # probe, attention, LN, MLP
    return embeddings + (2 * D if clip else 0) + t.n_layers * block + 2 * D + head


def feed_forward_params(dim: int, mult: int) -> int:
    return 2 * dim + 2 * mult * dim * dim  # LayerNorm + two bias-free matrices


def resampler_params(v: VisionConfig) -> int:
    D, inner = v.tower.hidden_size, v.resampler_heads * v.resampler_head_dim
    attention = 4 * D + 4 * D * inner  # two LayerNorms; q, k, v, o
    return v.n_latents * D + v.resampler_layers * (attention + feed_forward_params(D, v.ff_mult)) + 2 * D


def cross_attention_block_params(v: VisionConfig) -> int:
    D, Dv, inner = v.text_d_model, v.tower.hidden_size, v.cross_attention_heads * v.cross_attention_head_dim
    return 2 * D + 2 * D * inner + 2 * Dv * inner + feed_forward_params(D, v.ff_mult) + 2  # + the two gates


@dataclass(frozen=True)
class VisionParamCounts:
    tower: int
    resampler: int
    cross_attention: int  # all gated blocks

    @property
    def added(self) -> int:
        """What joining vision adds to the text model."""
        return self.tower + self.resampler + self.cross_attention

    def to_dict(self) -> dict:
        return {**asdict(self), "added": self.added}


def vision_param_counts(v: VisionConfig) -> VisionParamCounts:
    return VisionParamCounts(tower=tower_param_counts(v.tower), resampler=resampler_params(v),
                             cross_attention=len(v.cross_attention_layers) * cross_attention_block_params(v))


def image_flops(v: VisionConfig) -> int:
    """Forward FLOPs to encode one image: the tower over its S positions, then the resampler."""
    t = v.tower
    D, S = t.hidden_size, t.n_positions
    tower = S * 2 * (t.num_channels * t.patch_size ** 2 * D + t.n_layers * (4 * D * D + 2 * D * t.intermediate_size))
    tower += t.n_layers * 4 * S * S * D  # scores and values
    inner, L = v.resampler_heads * v.resampler_head_dim, v.n_latents
    per_layer = 2 * L * D * inner * 2 + 2 * (S + L) * D * inner * 2 + 4 * L * (S + L) * inner
    per_layer += 2 * L * 2 * v.ff_mult * D * D
    return tower + v.resampler_layers * per_layer


def cross_attention_flops_per_token(v: VisionConfig) -> int:
    """A text token's FLOPs in the gated blocks (its image's K/V computed once per image, not here)."""
    D, inner = v.text_d_model, v.cross_attention_heads * v.cross_attention_head_dim
    return len(v.cross_attention_layers) * (2 * 2 * D * inner + 4 * v.n_latents * inner + 2 * 2 * v.ff_mult * D * D)
