"""An 8-bit paged KV cache: each slot's key (or value) of each kv head stored as Dh int8 or fp8
(e4m3) values with one fp32 scale, the head's largest |x| over the format's largest value (127 or
448), as vLLM's per-head KV scales and llama.cpp's q8_0 cache do per block. A token then costs
G * (Dh + 4) bytes per layer for keys or values instead of G * Dh * 4 in fp32 (G * Dh * 2 in bf16).

``QuantizedSlots`` stands where a (slots, G, Dh) tensor stands in the paged cache: ``index_copy_``
quantizes the rows written, ``index_select`` gives rows back dequantized in the compute dtype, so
the attention code (paged_cache.py, the decode program's PyTorch path) reads it as it reads a
tensor; the C++ decode layer reads ``values`` and ``scales`` directly.

Legend: slots = blocks * block_size, G kv heads, Dh head dim, n rows.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # --kv-cache-dtype (besides "auto": the model's)
_LARGEST = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, G, Dh) -> (values (n, G, Dh) in ``dtype``, scales (n, G) fp32): per head, the largest |x|
    maps to the format's largest value (an all-zero head: scale 1)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / _LARGEST[dtype]  # (n, G)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = xf / scale[..., None]
    if dtype == torch.int8:
        return torch.round(y).clamp_(-127, 127).to(torch.int8), scale
    return y.to(dtype), scale


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, G, Dh) values and (n, G) scales -> (n, G, Dh) in ``dtype``."""
    return (values.float() * scales[..., None]).to(dtype)


class QuantizedSlots:
    """A layer's keys (or values) for every slot, 8-bit with a scale per slot and head."""

    def __init__(self, slots: int, G: int, Dh: int, storage: torch.dtype, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.values = torch.zeros(slots, G, Dh, dtype=storage, device=device)
        self.scales = torch.ones(slots, G, dtype=torch.float32, device=device)
        self.dtype = dtype  # what rows are written in and read back as (the model's)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def index_copy_(self, dim: int, index: torch.Tensor, rows: torch.Tensor) -> QuantizedSlots:
        """rows (n, G, Dh) into slots ``index`` (n,), quantized."""
        assert dim == 0
        values, scales = quantize_kv(rows, self.values.dtype)
        self.values.view(torch.uint8).index_copy_(0, index, values.view(torch.uint8))  # (as bytes: fp8 has no
        self.scales.index_copy_(0, index, scales)  # index_copy on a CPU)
        return self

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """(n, G, Dh) rows of slots ``index``, dequantized in ``dtype``."""
        assert dim == 0
        values = self.values.view(torch.uint8).index_select(0, index).view(self.values.dtype)
        return dequantize_kv(values, self.scales.index_select(0, index), self.dtype)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * 4


def kv_storage(kv_dtype: str) -> torch.dtype:
    """--kv-cache-dtype int8 / fp8 -> the values' dtype; a one-line error for another name."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv cache dtype {kv_dtype!r} is not one of auto, {', '.join(KV_DTYPES)}")
    return KV_DTYPES[kv_dtype]


