"""The image encoder: a ViT in the CLIP layout (CLIP's and SigLIP's variants), separate from the text
model as the article describes GPT-4's (and as Flamingo joins a frozen NFNet to a frozen LM).

patch conv -> (+ class token) + learned positions -> (CLIP: pre-norm) -> N x [LN -> attention -> LN -> MLP]
-> CLIP: pooled = post-norm(class token); SigLIP: every patch post-normed, pooled by the attention head.
``forward`` returns what transformers' CLIPVisionModel / SiglipVisionModel return as
``last_hidden_state`` and ``pooler_output``; checkpoint/vision_hf.py maps the weight names.

Legend: N images, C channels, P patch size, S positions (patches + class token), Dv hidden size,
H heads, Dh head dim, F intermediate size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.vision_config import TowerConfig, TowerKind


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """transformers' activations by their config names."""
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


@dataclass
class TowerOutput:
    hidden: torch.Tensor  # (N, S, Dv) last layer's features (SigLIP: post-normed)
    pooled: torch.Tensor | None  # (N, Dv); None for a SigLIP tower without its head


class TowerMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class TowerAttention(nn.Module):
    """Bidirectional multi-head self-attention over one image's positions (biases on, as CLIP)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        D = cfg.hidden_size
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, S, D = x.shape
        H = self.n_heads
        q, k, v = (w(x).view(N, S, H, D // H).transpose(1, 2) for w in (self.wq, self.wk, self.wv))  # (N, H, S, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, Dh)
        return self.wo(out.transpose(1, 2).reshape(N, S, D))


class TowerBlock(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = TowerAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = TowerMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Module):
    """SigLIP's pooling head: one learned probe attends over the patches, then an MLP."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.n_heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = TowerMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # (N, 1, Dv)
        h = self.attention(probe, x, x, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return h[:, 0]  # (N, Dv)


class VisionTower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        clip = cfg.kind == TowerKind.CLIP
        D = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size, bias=not clip)
        self.class_embed = nn.Parameter(torch.zeros(D)) if clip else None
        self.pos_embed = nn.Embedding(cfg.n_positions, D)
        self.pre_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if clip else None
        self.blocks = nn.ModuleList(TowerBlock(cfg) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = AttentionPoolHead(cfg) if cfg.use_head else None

    def pooling_modules(self) -> list[nn.Module]:
        """What only the pooled output uses (CLIP's post-norm of the class token, SigLIP's head): a
        vision model reads the features, so these get no gradient there."""
        if self.class_embed is not None:
            return [self.post_norm]
        return [self.head] if self.head is not None else []

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """One-line error for pixels this tower cannot take."""
        c, s = self.cfg.num_channels, self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel values of shape {tuple(pixels.shape)}: this vision tower takes (N, {c}, {s}, {s})")

    def forward(self, pixels: torch.Tensor) -> TowerOutput:
        """pixels (N, C, H, W), normalised as data/images.py prepares them."""
        self.check_pixels(pixels)
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (N, Dv, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (N, S', Dv) patches in row-major order
        if self.class_embed is not None:
            cls = self.class_embed.expand(x.shape[0], 1, -1)  # (N, 1, Dv)
            x = torch.cat([cls, x], dim=1)  # (N, S, Dv)
        x = x + self.pos_embed.weight
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.class_embed is not None:  # CLIP: features as they leave the encoder, the class token normed
            return TowerOutput(hidden=x, pooled=self.post_norm(x[:, 0]))
        x = self.post_norm(x)
        return TowerOutput(hidden=x, pooled=None if self.head is None else self.head(x))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """CLIP's scheme (N(0, 0.02) matrices and embeddings, zero biases, unit norms), except the
        patches' position embeddings: a 2-D sine-cosine table (MAE's), as large as the patch
        embedding's output at init, so a fresh tower knows where each patch is from the first step.

        With CLIP's N(0, 0.02) positions are ~14x smaller than the demo tower's patch features,
        and a resampler's latents (which mix patches, then lose their order) carry no position:
        the demo tower and resampler trained on the generated scenes' fields for 300 steps named
        the position at chance (11%); with this table, 96-98% (docs/vision.md)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                std = 0.02 if p.dim() > 1 or name.endswith(("class_embed", "probe")) else 1.0 / math.sqrt(p.numel())
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        cfg = self.cfg
        patch_std = 0.02 * math.sqrt(cfg.num_channels * cfg.patch_size ** 2)  # the conv's output, unit pixels
        self.pos_embed.weight[-cfg.grid ** 2:] = sincos_positions(cfg.grid, cfg.hidden_size) * patch_std


def sincos_positions(grid: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """(grid * grid, dim): row-major patches' 2-D sine-cosine codes, a quarter of ``dim`` each for
    sin(x), cos(x), sin(y), cos(y) over geometric frequencies 1 .. 1/base (dims past 4*(dim//4) zero)."""
    quarter = dim // 4
    freqs = base ** -(torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))  # (dim/4,)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    x, y = x.reshape(-1, 1) * freqs, y.reshape(-1, 1) * freqs  # (grid^2, dim/4)
    table = torch.zeros(grid * grid, dim, dtype=torch.float64)
    table[:, :4 * quarter] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return table.float()
