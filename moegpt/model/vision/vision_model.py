"""A text model that sees: ``add_vision(model, VisionConfig)`` joins an image tower, a Perceiver
resampler and gated cross-attention blocks to a moegpt text model, from outside (Flamingo's recipe).

The text model is not changed: its modules, parameter names and forward stay as they are, and
``VisionMoEGPT.text`` is that same model. The vision model's forward runs the text model's layers
in order and, before each layer in ``cross_attention_layers``, a gated block over the images.

Legend: B batch, T tokens, N images, C channels, S image side, L latents, Dv latent width, D d_model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from moegpt.model.attention import KVCacheView
from moegpt.model.model import ModelOutput, MoEGPT
from moegpt.model.moe import RouterStats
from moegpt.model.rope import rope_cos_sin
from moegpt.model.vision.cross_attention import GatedCrossAttentionBlock, ImageContext
from moegpt.model.vision.resampler import PerceiverResampler
from moegpt.model.vision.tower import VisionTower
from moegpt.vision_config import VisionConfig


RESAMPLER_QUERY_GAIN = 4.0  # the resampler's query matrices at init, x fan-in scale (measured: docs/vision.md)


class VisionMoEGPT(nn.Module):
    def __init__(self, text: MoEGPT, cfg: VisionConfig, tower: VisionTower):
        super().__init__()
        cfg.check_fits(text.cfg)
        if tower.cfg != cfg.tower:
            raise ValueError(f"the vision tower's config {tower.cfg} is not the vision config's {cfg.tower}")
        self.vision_cfg = cfg
        self.text = text
        self.tower = tower
        self.resampler = PerceiverResampler(cfg)
        self.cross_attn = nn.ModuleDict({str(i): GatedCrossAttentionBlock(text.cfg.d_model, cfg)
                                         for i in cfg.cross_attention_layers})

    @property
    def cfg(self):
        """The text model's config: what the trainer and engine read for shapes and context."""
        return self.text.cfg

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> resampled latents (N, L, Dv): once per image, however many tokens see it."""
        return self.resampler(self.tower(pixels).hidden)

    def images(self, pixels: torch.Tensor, locations: torch.Tensor) -> ImageContext:
        """Encode ``pixels`` and place them at ``locations`` (B, T) bool, the rows' image tokens."""
        return ImageContext.from_locations(self.encode_images(pixels), locations)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: Sequence[KVCacheView] | None = None, images: ImageContext | None = None,
                pixels: torch.Tensor | None = None, locations: torch.Tensor | None = None) -> ModelOutput:
        """As MoEGPT.forward, plus ``images`` (None: a text-only batch, computed as the text model), or
        the images' ``pixels`` (N, C, S, S) and ``locations`` (B, T) to encode them here (so that a
        data-parallel wrapper sees the whole computation in its forward)."""
        if pixels is not None:
            images = self.images(pixels, locations)
        x, stats = self.trunk(tokens, positions, cache, images)
        return ModelOutput(logits=self.text.head(x), router=stats)  # logits (B, T, V)

    def trunk(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              cache: Sequence[KVCacheView] | None = None,
              images: ImageContext | None = None) -> tuple[torch.Tensor, list[RouterStats]]:
        text = self.text
        if images is None:
            return text.trunk(tokens, positions, cache)
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        cos, sin = rope_cos_sin(positions, text.cfg.head_dim, text.cfg.rope_theta, text.cfg.rope_scaling,
                                text._rope_len(positions, cache))  # (T, Dh), or (B, T, Dh)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh)
        x = text.embed(tokens)  # (B, T, D)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        stats: list[RouterStats] = []
        for i, layer in enumerate(text.layers):
            x = self.cross_attend(i, x, images)
            x, s = layer(x, cos, sin, positions, None if cache is None else cache[i])
            if s is not None:
                stats.append(s)
        return text.norm(x), stats

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.text.head(x)

    def image_keys_values(self, latents: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """latents (N, L, Dv) -> each gated layer's image keys and values (N, L, H, Dh), by decoder
        layer: what a serving cache computes once per image and keeps."""
        return {int(i): block.attn.keys_values(latents.to(self.text.norm.weight.dtype))
                for i, block in self.cross_attn.items()}

    def cross_attend(self, layer: int, x: torch.Tensor, images: ImageContext) -> torch.Tensor:
        """The gated block before decoder ``layer`` (if any) on x (B, T, D): the decode program's hook."""
        block = self.cross_attn[str(layer)] if str(layer) in self.cross_attn else None
        return x if block is None else block(x, images, images.layer_keys_values(layer))

    def vision_modules(self) -> dict[str, nn.Module]:
        """The parts vision training adds, by name (the text model is everything else)."""
        return {"tower": self.tower, "resampler": self.resampler, "cross_attn": self.cross_attn}

    @torch.no_grad()
    def init_vision_weights(self, seed: int = 0, tower: bool = True) -> None:
        """The resampler's and gated blocks' matrices N(0, 1/fan_in), latents N(0, 0.02), unit norms,
        zero biases; the gates at 0 (Flamingo), so the joined model starts as the text model.
        ``tower`` False keeps a loaded tower's weights.

        Fan-in scaling, not CLIP's N(0, 0.02): the image signal crosses several products in a row
        (values, output, feed-forward), and at 0.02 each shrinks it. Measured with a probe on the
        generated scenes (the demo tower and resampler, a linear head on the mean latent, 32
        pictures a step): colour 17% (chance) after 300 steps at 0.02, 95% with fan-in.

        The resampler's queries start RESAMPLER_QUERY_GAIN times larger, so its latents attend to
        a few patches rather than averaging all of them: a scene's shapes cover ~3% of the
        picture, and with an even average the same probe named their position at chance (11%)
        after 300 steps; with the gain, 96% (with the tower's sine-cosine positions)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        if tower:
            self.tower.init_weights(g)
        for module in (self.resampler, self.cross_attn):
            for name, p in module.named_parameters():
                if name.endswith("gate") or name.endswith("bias"):
                    p.zero_()
                elif name.endswith("latents"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif p.dim() == 1:
                    p.fill_(1.0)  # LayerNorm weights
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        for attn, _ in self.resampler.layers:
            attn.wq.weight.mul_(RESAMPLER_QUERY_GAIN)


def add_vision(model: MoEGPT, cfg: VisionConfig, tower: VisionTower | None = None, seed: int = 0) -> VisionMoEGPT:
    """Join ``model`` to an image tower (``tower``, e.g. a loaded CLIP, or a fresh one) through a new
    resampler and gated cross-attention blocks; the new parts take the text model's device and dtype."""
    cfg.check_fits(model.cfg)
    weight = model.norm.weight  # (dtype and device, without dequantizing a quantized table)
    fresh = tower is None
    if fresh:
        with torch.device("meta"):
            tower = VisionTower(cfg.tower)
    with torch.device("meta"):
        vision = VisionMoEGPT(model, cfg, tower)
    for name, module in vision.vision_modules().items():
        if name != "tower" or fresh:
            module.to_empty(device=weight.device)
    if weight.device.type != "meta":
        vision.init_vision_weights(seed, tower=fresh)
    vision.tower.to(device=weight.device, dtype=weight.dtype)
    vision.resampler.to(dtype=weight.dtype)
    vision.cross_attn.to(dtype=weight.dtype)
    return vision
