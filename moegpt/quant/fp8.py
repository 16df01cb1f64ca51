"""FP8 (e4m3) weights, the DeepSeek / vLLM "FP8 dynamic" scheme: each output channel's weights as
e4m3 values with one fp32 scale (its largest |w| over 448), and at run time each row of
activations quantized to e4m3 the same way, so the product runs as one ``torch._scaled_mm`` (fp8
tensor cores on Hopper GPUs; PyTorch's CPU fallback here) with row-wise scales on both sides.
``fp8_reference`` is that product's definition in plain fp32 ops, the tests' oracle.

Legend: M rows, O out features, I in features.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
LARGEST = 448.0  # e4m3's largest finite value


def _scales(x: torch.Tensor) -> torch.Tensor:
    """(..., R, I) -> (..., R, 1) fp32: each row's largest |x| over 448 (an all-zero row: 1)."""
    s = x.float().abs().amax(dim=-1, keepdim=True) / LARGEST
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_fp8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> (values (..., O, I) e4m3, scale (..., O, 1) fp32), the scale rounded to
    ``scale_dtype`` (the dtype a directory stores it in) before the values are taken from it."""
    scale = _scales(w).to(scale_dtype).float()
    return (w.float() / scale).clamp_(-LARGEST, LARGEST).to(E4M3), scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x (M, I) -> (values (M, I) e4m3, scale (M, 1) fp32), per row."""
    scale = _scales(x)
    return (x.float() / scale).to(E4M3), scale


def fp8_activation_values(x: torch.Tensor) -> torch.Tensor:
    """x (M, I) -> the fp32 values an fp8 product multiplies."""
    values, scale = quantize_fp8_rows(x)
    return values.float() * scale


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, I) times the fp8 weight w (O, I) with scale (O, 1) -> (M, O) fp32, in one scaled matmul."""
    xq, sx = quantize_fp8_rows(x)
    return torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=scale.view(1, -1), out_dtype=torch.float32)


def fp8_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8_matmul`` in fp32 ops: the activations' and the weight's fp8 values times their scales."""
    return fp8_activation_values(x) @ (w.float() * scale).t()
