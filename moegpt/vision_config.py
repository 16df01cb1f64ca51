"""VisionConfig: the image side of a Flamingo-style moegpt, as frozen dataclasses.

Three parts, as the article describes GPT-4's vision (and Flamingo builds it): a ViT image encoder
in the CLIP layout (``TowerConfig``; CLIP's or SigLIP's variant), a Perceiver resampler that turns
each image's patch features into ``n_latents`` vectors, and gated cross-attention blocks inserted
before every ``cross_attention_every``-th decoder layer of a trained text model.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from moegpt.config import ModelConfig


class TowerKind(str, enum.Enum):
    """The two ViT variants transformers ships in the CLIP layout."""

    CLIP = "clip"  # class token, pre-norm after the embeddings, bias-free patch conv
    SIGLIP = "siglip"  # no class token, a final norm over every patch, optional attention-pool head


ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")  # transformers' names, as config.json stores them


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner} {name}={value!r} must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class TowerConfig:
    """A ViT image encoder; field for field transformers' CLIPVisionConfig / SiglipVisionConfig."""

    kind: TowerKind = TowerKind.CLIP
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    n_layers: int = 12
    n_heads: int = 12
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    use_head: bool = False  # SigLIP's attention-pool head (vision_use_head); CLIP has none

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TowerKind):
            try:
                object.__setattr__(self, "kind", TowerKind(self.kind))
            except ValueError:
                raise ValueError(f"vision tower kind={self.kind!r} is not one of "
                                 f"{[k.value for k in TowerKind]}") from None
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "n_layers",
                     "n_heads"):
            _positive_int("vision tower", name, getattr(self, name))
        if self.patch_size > self.image_size:
            raise ValueError(f"vision tower patch_size ({self.patch_size}) is larger than image_size "
                             f"({self.image_size})")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"vision tower hidden_size ({self.hidden_size}) is not divisible by n_heads "
                             f"({self.n_heads})")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"vision tower layer_norm_eps={self.layer_norm_eps!r} must be a positive number")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision tower hidden_act={self.hidden_act!r} is not one of {list(ACTIVATIONS)}")
        if self.use_head and self.kind != TowerKind.SIGLIP:
            raise ValueError("vision tower use_head: only a SigLIP tower has an attention-pool head")

    @property
    def grid(self) -> int:
        """Patches per side (the conv's stride floors, as transformers')."""
        return self.image_size // self.patch_size

    @property
    def n_positions(self) -> int:
        """Tokens the encoder sees per image: its patches, plus CLIP's class token."""
        return self.grid ** 2 + (1 if self.kind == TowerKind.CLIP else 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kind": self.kind.value}


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The image side joined to one text model (``text_d_model`` wide, ``text_n_layers`` deep).

    Flamingo's resampler has 6 layers and 64 latents; its gated blocks sit before every 4th (or
    1st, for the smaller models) LM layer. Our defaults keep the 64 latents and fewer layers.
    """

    tower: TowerConfig
    text_d_model: int
    text_n_layers: int
    n_latents: int = 64
    resampler_layers: int = 2
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    cross_attention_every: int = 1  # a gated block before decoder layers 0, N, 2N, ...
    cross_attention_heads: int = 8
    cross_attention_head_dim: int = 64
    ff_mult: int = 4  # the gated block's and the resampler's feed-forward width, x their input
    max_images: int = 8  # per sequence

    def __post_init__(self) -> None:
        if isinstance(self.tower, dict):
            object.__setattr__(self, "tower", TowerConfig(**self.tower))
        if not isinstance(self.tower, TowerConfig):
            raise ValueError(f"vision tower={self.tower!r} must be a TowerConfig or a dict of its fields")
        for f in dataclasses.fields(self):
            if f.name != "tower":
                _positive_int("vision", f.name, getattr(self, f.name))
        if self.cross_attention_every > self.text_n_layers:
            raise ValueError(f"vision cross_attention_every={self.cross_attention_every} is more than the text "
                             f"model's {self.text_n_layers} layers")

    @staticmethod
    def for_text(cfg: ModelConfig, tower: TowerConfig, **fields) -> "VisionConfig":
        """The vision part for ``cfg``: unless given, the resampler's heads are the tower's and the
        gated blocks' heads the text model's (their counts and widths), as Flamingo sizes them."""
        widths = {"resampler_heads": tower.n_heads, "resampler_head_dim": tower.head_dim,
                  "cross_attention_heads": cfg.n_heads, "cross_attention_head_dim": cfg.head_dim}
        return VisionConfig(tower=tower, text_d_model=cfg.d_model, text_n_layers=cfg.n_layers, **(widths | fields))

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """The decoder layers a gated cross-attention block runs before."""
        return tuple(range(0, self.text_n_layers, self.cross_attention_every))

    def check_fits(self, cfg: ModelConfig) -> None:
        """One-line error when this vision part was made for another text model."""
        if (self.text_d_model, self.text_n_layers) != (cfg.d_model, cfg.n_layers):
            raise ValueError(f"the vision config was made for a text model with d_model={self.text_d_model}, "
                             f"{self.text_n_layers} layers; this one has d_model={cfg.d_model}, {cfg.n_layers} layers")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tower": self.tower.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown VisionConfig field(s): {sorted(unknown)}")
        tower = d.get("tower")
        if isinstance(tower, dict):
            unknown = set(tower) - {f.name for f in dataclasses.fields(TowerConfig)}
            if unknown:
                raise ValueError(f"unknown vision tower field(s): {sorted(unknown)}")
        return cls(**d)


TOWER_PRESETS: dict[str, TowerConfig] = {
    # Trains on 2 CPU cores beside the tiny text model: 64x64 screenshots in 8x8 patches.
    "tiny": TowerConfig(kind=TowerKind.CLIP, image_size=64, patch_size=8, hidden_size=128, intermediate_size=256,
                        n_layers=2, n_heads=4),
    # What `moegpt train-vision` trains from scratch beside the tiny demo model: 96x96 pictures (a
    # 32-character line of text in three rows) in 8x8 patches.
    "demo": TowerConfig(kind=TowerKind.CLIP, image_size=96, patch_size=8, hidden_size=128, intermediate_size=512,
                        n_layers=3, n_heads=4),
    # The shapes of openai/clip-vit-base-patch16, openai/clip-vit-large-patch14 and SigLIP so400m/14 at 384.
    "clip-vit-b-16": TowerConfig(kind=TowerKind.CLIP, image_size=224, patch_size=16, hidden_size=768,
                                 intermediate_size=3072, n_layers=12, n_heads=12),
    "clip-vit-l-14": TowerConfig(kind=TowerKind.CLIP, image_size=224, patch_size=14, hidden_size=1024,
                                 intermediate_size=4096, n_layers=24, n_heads=16),
    "siglip-so400m-14-384": TowerConfig(kind=TowerKind.SIGLIP, image_size=384, patch_size=14, hidden_size=1152,
                                        intermediate_size=4304, n_layers=27, n_heads=16, layer_norm_eps=1e-6,
                                        hidden_act="gelu_pytorch_tanh", use_head=True),
}


def tower_preset(name: str) -> TowerConfig:
    try:
        return TOWER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown vision tower preset {name!r}; choose one of {sorted(TOWER_PRESETS)}") from None
