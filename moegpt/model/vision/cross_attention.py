"""Flamingo's gated cross-attention dense block, inserted before a text decoder layer, and the rule
for which image a token sees.

x -> y = x + tanh(a) * xattn(LN(x), image latents); y = y + tanh(b) * FFW(y), gates a = b = 0 at
initialisation, so a freshly joined model computes exactly what the text model does. A token sees
only the most recent image at or before it (Flamingo's rule); a token before any image sees none and
passes through unchanged, so text-only rows keep the text model's output bit for bit.

Legend: B batch, T tokens, N images in the batch, L latents per image, D text width, Dv latent
width, H heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.model.vision.resampler import feed_forward
from moegpt.vision_config import VisionConfig


@dataclass(frozen=True)
class ImageContext:
    """The batch's images and which one each token sees: an argument, like a KV-cache view."""

    latents: torch.Tensor | None  # (N, L, Dv) resampled images, in the order their image tokens appear (row-major)
    image_of_token: torch.Tensor  # (B, T) long: the image a token sees (its row's first where it sees none)
    sees_image: torch.Tensor  # (B, T) bool: False before a row's first image
    row_first: torch.Tensor  # (B,) long: the index of each row's first image
    row_count: torch.Tensor  # (B,) long: images in each row
    # each gated layer's image keys and values (N, L, H, Dh) computed already (a serving cache's),
    # by decoder layer index; None: computed here from ``latents``
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def from_locations(latents: torch.Tensor, locations: torch.Tensor) -> "ImageContext":
        """locations (B, T) bool: where each image sits (its image token); rows' images in order."""
        n_images = int(locations.sum())
        if n_images != latents.shape[0]:
            raise ValueError(f"{n_images} image tokens in the batch but {latents.shape[0]} images")
        seen = locations.long().cumsum(1)  # (B, T) images at or before each token, per row
        count = seen[:, -1]  # (B,)
        first = count.cumsum(0) - count  # (B,) images in earlier rows
        image = torch.maximum(first[:, None] + seen - 1, first[:, None]).clamp(max=max(n_images - 1, 0))
        return ImageContext(latents=latents, image_of_token=image, sees_image=seen > 0, row_first=first,
                            row_count=count)

    @staticmethod
    def cached(image_of_token: torch.Tensor, sees_image: torch.Tensor,
               keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> "ImageContext":
        """One row of N tokens (a serving step's flattened chunks) over images whose keys and values
        per gated layer are given: image_of_token (1, N) indexes them."""
        n_images = next(iter(keys_values.values()))[0].shape[0]
        zero = torch.zeros(1, dtype=torch.long, device=image_of_token.device)
        return ImageContext(latents=None, image_of_token=image_of_token, sees_image=sees_image, row_first=zero,
                            row_count=zero + n_images, keys_values=keys_values)

    def layer_keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.keys_values is None else self.keys_values[layer]


def attend_to_images(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, images: ImageContext) -> torch.Tensor:
    """q (B, H, T, Dh); k/v (N, L, H, Dh) per image; each token attends to its image's L latents only.
    -> (B, H, T, Dh). Each row's keys are only its own images' (M at most per row, padded), so the
    cost grows with the images of a row, not of the batch."""
    N, L, H, Dh = k.shape
    B = q.shape[0]
    M = max(int(images.row_count.max()), 1) if B else 1
    slot = torch.arange(M, device=q.device)  # (M,)
    index = (images.row_first[:, None] + slot).clamp(max=N - 1)  # (B, M) the row's images (padding repeats one)
    keys = k[index].reshape(B, M * L, H, Dh).transpose(1, 2)  # (B, H, M*L, Dh)
    values = v[index].reshape(B, M * L, H, Dh).transpose(1, 2)
    local = images.image_of_token - images.row_first[:, None]  # (B, T) in [0, M)
    mask = (local[:, :, None] == slot.repeat_interleave(L))[:, None]  # (B, 1, T, M*L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, latent_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(d_model)
        self.wq = nn.Linear(d_model, heads * head_dim, bias=False)
        self.wkv = nn.Linear(latent_dim, 2 * heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, d_model, bias=False)

    def keys_values(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (N, L, Dv) -> k, v (N, L, H, Dh): what a serving cache keeps per image and layer."""
        N, L, _ = latents.shape
        k, v = self.wkv(latents).view(N, L, 2, self.heads, self.head_dim).unbind(2)
        return k, v

    def forward(self, x: torch.Tensor, images: ImageContext,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); ``kv``: this layer's image keys and values, computed already."""
        B, T, _ = x.shape
        q = self.wq(self.norm(x)).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k, v = kv if kv is not None else self.keys_values(images.latents.to(x.dtype))
        out = attend_to_images(q, k, v, images)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, d_model: int, cfg: VisionConfig):
        super().__init__()
        self.attn = CrossAttention(d_model, cfg.tower.hidden_size, cfg.cross_attention_heads,
                                   cfg.cross_attention_head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff = feed_forward(d_model, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, images: ImageContext,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); rows' tokens that see no image come back unchanged."""
        y = x + torch.tanh(self.attn_gate) * self.attn(x, images, kv)
        y = y + torch.tanh(self.ff_gate) * self.ff(y)
        return torch.where(images.sees_image[..., None], y, x)
