"""Rotary position embeddings (RoPE), plain and scaled past the pre-trained context.

The scaled variants are transformers' (``rope_parameters`` with ``rope_type``), number for number,
so a moegpt directory and its HF Mixtral twin agree at every position:
- linear (position interpolation): every inverse frequency divided by ``factor``;
- dynamic (NTK-aware): the base grows once a sequence passes the original context C,
  theta' = theta * (factor * L / C - (factor - 1)) ** (Dh / (Dh - 2)) at length L. transformers
  recomputes it from each forward's longest position, which a KV cache cannot follow (keys
  cached at one base are read at another), so cached inference fixes L at max_seq_len (= factor x C),
  as vLLM does; an uncached forward uses its own length, as transformers does;
- yarn (NTK-by-parts): frequencies that turn fewer than ``beta_slow`` times over C are
  interpolated, more than ``beta_fast`` times kept, a linear ramp between; cos and sin scaled by
  ``attention_factor`` (0.1 ln(factor) + 1 unless given), which sharpens attention.

Legend: T tokens, B rows, Dh head dim.
"""

from __future__ import annotations

import math

import torch

from moegpt.config import RopeScaling, RopeType


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     seq_len: int | None = None, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (Dh/2,) fp32 and the cos/sin scale. ``seq_len``: the length a dynamic
    scaling is evaluated at (ignored by the others; None: the original context)."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim  # (Dh/2,)
    if scaling is None:
        return 1.0 / (theta ** exponents), 1.0
    factor = scaling.factor
    if scaling.type == RopeType.LINEAR:
        return 1.0 / (theta ** exponents) / factor, 1.0
    original = scaling.original_max_seq_len
    if scaling.type == RopeType.DYNAMIC:
        length = max(seq_len or original, original)
        base = theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    # yarn
    attention = scaling.attention_factor if scaling.attention_factor is not None else 0.1 * math.log(factor) + 1.0

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times over C
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the plain frequency), 0: interpolate (divided by factor)
    plain = 1.0 / (theta ** exponents)
    return plain / factor * (1 - keep) + plain * keep, float(attention)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                 seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions (T,) or (B, T) -> two (T, Dh) or (B, T, Dh) fp32 tensors.

    The "rotate half" layout (first half of the head paired with the second), as HF Llama/Mixtral.
    """
    inv_freq, scale = rope_frequencies(head_dim, theta, scaling, seq_len, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated by position; cos/sin (T, Dh), or (B, 1, T, Dh) for positions per row."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotated * sin
