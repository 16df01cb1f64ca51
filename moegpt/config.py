"""ModelConfig: one frozen dataclass that describes every moegpt model size, and the presets.

Every field is a plain number or an Enum; variants are parameters, not flags that fork a block:
multi-query attention is ``n_kv_heads=1``, a dense layer is a layer that ``moe_every`` skips, and the
article's two-matrix GELU experts are ``mlp=MLPKind.GELU``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class MLPKind(str, enum.Enum):
    """The feed-forward shape of each expert (and of dense layers)."""

    SWIGLU = "swiglu"  # three matrices: down(silu(gate(x)) * up(x)), as Mixtral / Llama
    GELU = "gelu"  # two matrices: down(gelu(up(x))), as GPT-3 and the article's GPT-4 estimate


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The shape of a decoder-only MoE transformer.

    ``d_ff`` is the hidden size of one expert (and of the MLP in dense layers). Layer ``i`` is an
    MoE layer when ``(i + 1) % moe_every == 0``: ``moe_every=1`` makes every layer MoE, ``2`` every
    second one (GShard / Switch style). ``capacity_factor=None`` routes every token (dropless).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int = 1
    head_dim: int | None = None  # None: d_model // n_heads
    mlp: MLPKind = MLPKind.SWIGLU
    n_experts: int = 16
    top_k: int = 2
    moe_every: int = 1
    capacity_factor: float | None = None
    rope_theta: float = 10_000.0
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mlp, MLPKind):
            try:
                object.__setattr__(self, "mlp", MLPKind(self.mlp))
            except ValueError:
                raise ValueError(f"mlp={self.mlp!r} is not one of {[k.value for k in MLPKind]}") from None
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_kv_heads", "n_experts", "top_k",
                     "moe_every", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps") + (("capacity_factor",) if self.capacity_factor is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r} must be true or false")
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set head_dim"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise ValueError(f"head_dim={self.head_dim!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) > n_experts ({self.n_experts})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    # ---- derived shape -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    # ---- (de)serialisation ---------------------------------------------------------------------
    def replace(self, **overrides) -> "ModelConfig":
        """A copy with ``overrides``. A head_dim that followed d_model / n_heads follows the new ones."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        reshaped = {"d_model", "n_heads"} & set(overrides)
        if reshaped and "head_dim" not in overrides and self.head_dim * self.n_heads == self.d_model:
            overrides["head_dim"] = None
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp"] = self.mlp.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return cls(**d)


def field_differences(old: dict, new: dict, ignore: frozenset[str] = frozenset()) -> list[str]:
    """'name: old -> new' for each field that differs (for one-line resume errors)."""
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in old if k not in ignore and old[k] != new.get(k)]


PRESETS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores in minutes; the same architecture as gpt4 (16 experts, top-2, MQA).
    "tiny": ModelConfig(
        vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1, d_ff=256,
        n_experts=16, top_k=2, max_seq_len=512, rope_theta=10_000.0,
    ),
    # The CPU benchmark size: 0.52B total, 0.12B active per token.
    "small": ModelConfig(
        vocab_size=32_000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=1, d_ff=1024,
        n_experts=16, top_k=2, max_seq_len=2048, rope_theta=10_000.0,
    ),
    # HF Mixtral-8x7B's shape (GQA with 8 KV heads).
    "mixtral-8x7b": ModelConfig(
        vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        d_ff=14_336, n_experts=8, top_k=2, max_seq_len=32_768, rope_theta=1e6,
    ),
    # The article's estimate (the planner spec's shape): ~1.83T total, ~282B active; meta device only.
    "gpt4": ModelConfig(
        vocab_size=100_277, d_model=15_360, n_layers=120, n_heads=120, n_kv_heads=1, head_dim=128,
        d_ff=30_080, mlp=MLPKind.GELU, n_experts=16, top_k=2, max_seq_len=8192, rope_theta=10_000.0,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
