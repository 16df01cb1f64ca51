"""ModelConfig: one frozen dataclass that describes every moegpt model size, and the presets.

Every field is a plain number or an Enum; variants are parameters, not flags that fork a block:
multi-query attention is ``n_kv_heads=1``, a dense layer is a layer that ``moe_every`` skips, and the
article's two-matrix GELU experts are ``mlp=MLPKind.GELU``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class RopeType(str, enum.Enum):
    """How RoPE is stretched past the context a model was pre-trained at (transformers' ``rope_type``)."""

    LINEAR = "linear"  # position interpolation: every frequency divided by the factor
    DYNAMIC = "dynamic"  # NTK-aware: the base grows with the sequence length beyond the original context
    YARN = "yarn"  # NTK-by-parts: low frequencies interpolated, high ones kept, attention temperature


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A scaled RoPE, with transformers 5's ``rope_parameters`` fields (model/rope.py has the math).

    ``original_max_seq_len`` is the context the model was pre-trained at (transformers'
    ``original_max_position_embeddings``): dynamic and YaRN scaling need it, linear records it.
    """

    type: RopeType
    factor: float
    original_max_seq_len: int | None = None
    beta_fast: float = 32.0  # YaRN: rotations above which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # YaRN: rotations below which a frequency is interpolated
    attention_factor: float | None = None  # YaRN: cos/sin scale; None: 0.1 * ln(factor) + 1
    truncate: bool = True  # YaRN: round the ramp's ends to whole dimensions

    def __post_init__(self) -> None:
        if not isinstance(self.type, RopeType):
            try:
                object.__setattr__(self, "type", RopeType(self.type))
            except ValueError:
                raise ValueError(f"rope scaling type={self.type!r} is not one of "
                                 f"{[k.value for k in RopeType]}") from None
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or not self.factor > 1:
            raise ValueError(f"rope scaling factor={self.factor!r} must be a number > 1")
        if self.original_max_seq_len is None and self.type != RopeType.LINEAR:
            raise ValueError(f"{self.type.value} rope scaling needs original_max_seq_len (the pre-trained context)")
        if self.original_max_seq_len is not None and (not isinstance(self.original_max_seq_len, int)
                                                      or isinstance(self.original_max_seq_len, bool)
                                                      or self.original_max_seq_len <= 0):
            raise ValueError(f"rope scaling original_max_seq_len={self.original_max_seq_len!r} must be a positive integer")
        if not (isinstance(self.beta_fast, (int, float)) and isinstance(self.beta_slow, (int, float))
                and 0 < self.beta_slow <= self.beta_fast):
            raise ValueError(f"rope scaling beta_fast={self.beta_fast!r}, beta_slow={self.beta_slow!r}: "
                             "want 0 < beta_slow <= beta_fast")
        if self.attention_factor is not None and not (isinstance(self.attention_factor, (int, float))
                                                      and self.attention_factor > 0):
            raise ValueError(f"rope scaling attention_factor={self.attention_factor!r} must be a positive number")
        if not isinstance(self.truncate, bool):
            raise ValueError(f"rope scaling truncate={self.truncate!r} must be true or false")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["type"] = self.type.value
        return d


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
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
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
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None:
            self._check_rope_scaling()
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

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, RopeScaling):
            raise ValueError(f"rope_scaling={scaling!r} must be a RopeScaling, a dict of its fields, or None")
        original = scaling.original_max_seq_len
        if original is not None and original > self.max_seq_len:
            raise ValueError(f"rope scaling original_max_seq_len ({original}) is longer than max_seq_len "
                             f"({self.max_seq_len})")
        # transformers and vLLM serve a dynamic model to factor x its original context; any other
        # length would not survive a save as an HF directory (max_position_embeddings is the original)
        if scaling.type == RopeType.DYNAMIC and self.max_seq_len != round(original * scaling.factor):
            raise ValueError(f"dynamic rope scaling serves original_max_seq_len x factor = "
                             f"{round(original * scaling.factor)} tokens, but max_seq_len={self.max_seq_len}")

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
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
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
