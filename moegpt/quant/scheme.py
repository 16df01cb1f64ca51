"""Weight-only integer quantization: the schemes, and the one pair of pure functions that quantize a
weight and give its values back.

Symmetric, with one scale per output channel (int8) or per group of ``group_size`` input features
(int4): w[o, i] ~= q[o, i] * scale[o, i // group_size], q in [-2^(b-1), 2^(b-1) - 1]. A scale is
the group's largest |w| over 2^(b-1) - 1, so the largest weight is exact and nothing is clipped.

Stored packed in bytes, unsigned with an offset of 2^(b-1) (int8: q + 128 per byte; int4: two
values per byte, the even-indexed one in the low nibble). This is compressed-tensors'
``pack-quantized`` layout (its int32 words, read as bytes on a little-endian machine), so a
directory's tensors load with a view and no copy, and the C++ kernels read the same bytes.

Decoding multiplies by a quantized weight with its activations quantized too, as llama.cpp's
quantized products do (its q8 activation blocks are 32 or 256 inputs): each row of x in blocks of
128 inputs, x ~= xq * sx with xq int8 in [-127, 127] and sx the block's largest |x| over 127, so
the dot products run on the CPU's int8 units and a block costs one float multiply-add (moegpt/
kernels/qgemv.h). ``quantized_matmul`` is that product's definition (and the kernels' oracle); it
applies where the inputs come in whole blocks (``int8_activations``), every shape of a real model.

Legend: M rows, O out features, I in features, G groups per row (1 per channel), P = I * bits / 8
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.quant.fp8 import fp8_activation_values, quantize_fp8

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
ACTIVATION_BLOCK = 128  # inputs sharing one activation scale; int8 activations where I is a multiple


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """bits 8 (per output channel unless group_size is set) or 4 (per group of group_size inputs);
    float8: fp8 e4m3 values per output channel instead of integers (fp8.py)."""

    bits: int
    group_size: int | None = None  # None: one scale per output channel
    float8: bool = False

    def __post_init__(self):
        if self.float8 and (self.bits != 8 or self.group_size is not None):
            raise ValueError(f"fp8 weights are 8-bit with one scale per output channel, got bits={self.bits} "
                             f"group_size={self.group_size}")
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not supported (8 or 4)")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported ({', '.join(map(str, GROUP_SIZES))})")
        if self.bits == 4 and self.group_size is None:
            raise ValueError("int4 needs a group size (32, 64 or 128)")

    @property
    def name(self) -> str:
        if self.float8:
            return "fp8"
        return f"int{self.bits}" + ("" if self.group_size is None else f"-g{self.group_size}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> int:
        """Scales per output row for ``in_features`` inputs; raises when the inputs do not divide."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(f"{self.name}: {in_features} input features are not a multiple of group size "
                             f"{self.group_size}")
        return in_features // self.group_size


def parse_scheme(name: str, group_size: int | None = None) -> QuantScheme:
    """``int8`` / ``int4`` (with ``group_size``, default 32 for int4) / ``fp8`` -> QuantScheme; one-line
    errors."""
    if name == "fp8":
        if group_size is not None:
            raise ValueError(f"fp8 takes no group size (one scale per output channel), got {group_size}")
        return QuantScheme(bits=8, float8=True)
    if name == "int8":
        return QuantScheme(bits=8, group_size=group_size)
    if name == "int4":
        return QuantScheme(bits=4, group_size=32 if group_size is None else group_size)
    raise ValueError(f"scheme {name!r} is not supported (int8, int4, fp8)")


def quantize(w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> (packed (..., O, P) uint8, scale (..., O, G) fp32). Each scale is rounded to
    ``scale_dtype`` (default w's: the dtype a directory stores it in) before q is computed from it,
    so what is saved dequantizes to exactly what was measured."""
    if scheme.float8:
        return quantize_fp8(w, scale_dtype or w.dtype)
    *lead, O, I = w.shape
    G = scheme.groups(I)
    if scheme.bits == 4 and I % 2:
        raise ValueError(f"int4 packs two values per byte: {I} input features is odd")
    wf = w.detach().float().reshape(*lead, O, G, I // G)  # (..., O, G, I/G)
    scale = wf.abs().amax(dim=-1) / scheme.qmax  # (..., O, G)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, q = 0
    scale = scale.to(scale_dtype or w.dtype).float()
    q = torch.round(wf / scale[..., None]).clamp_(-scheme.qmax - 1, scheme.qmax).reshape(*lead, O, I)
    return pack(q.to(torch.int8), scheme.bits), scale


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q (..., O, I) int8 in [-2^(b-1), 2^(b-1)) -> (..., O, I * bits / 8) uint8, offset by 2^(b-1)."""
    u = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    if bits == 8:
        return u
    return u[..., 0::2] | (u[..., 1::2] << 4)  # even index low nibble


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed (..., O, P) uint8 -> q (..., O, I) int8: ``pack``'s inverse."""
    if bits == 8:
        return (packed.to(torch.int16) - 128).to(torch.int8)
    low, high = packed & 0xF, packed >> 4
    return (torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8) - 8)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """packed (..., O, P), scale (..., O, G) -> w (..., O, I) in ``dtype``: q * scale computed in fp32
    (the kernels' oracle). fp8 weights (an e4m3 ``packed``, scale (..., O, 1)): the values times the scale."""
    q = packed.float() if packed.dtype == torch.float8_e4m3fn else unpack(packed, bits).float()  # (..., O, I)
    *lead, O, I = q.shape
    G = scale.shape[-1]
    w = q.view(*lead, O, G, I // G) * scale.float()[..., None]  # (..., O, G, I/G)
    return w.view(*lead, O, I).to(dtype)


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, bits: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``ids`` (...) of a row-packed (V, P) weight with scale (V, G) -> (..., I) in ``dtype``: an
    embedding table's lookup, only the rows read dequantized."""
    return dequantize(packed[ids], scale[ids], bits, dtype)


def in_features(packed: torch.Tensor, bits: int) -> int:
    """I of a packed (..., O, P) weight."""
    return packed.shape[-1] * 8 // bits


def int8_activations(in_features: int) -> bool:
    """Whether a quantized product quantizes its activations (the inputs come in whole chunks)."""
    return in_features % ACTIVATION_BLOCK == 0


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, I) -> (xq (M, I) int8 in [-127, 127], sx (M, I / 128) fp32): per block of 128 inputs,
    sx = max |x| / 127 and xq = round(x / sx) (an all-zero block: sx = 0, xq = 0)."""
    M, I = x.shape
    xb = x.float().view(M, I // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    sx = xb.abs().amax(dim=-1) / 127  # (M, I/128)
    safe = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = torch.round(xb / safe[..., None]).clamp_(-127, 127)
    return xq.view(M, I).to(torch.int8), sx


def product_activations(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (M, I) -> the fp32 values a product with the quantized weight ``packed`` multiplies: fp8
    weights, x's per-row fp8 values (fp8.py); integer ones, the int8 activations' values where
    ``int8_activations(I)``, else x itself."""
    if packed.dtype == torch.float8_e4m3fn:
        return fp8_activation_values(x)
    if not int8_activations(x.shape[-1]):
        return x.float()
    xq, sx = quantize_activations(x)
    return (xq.float().view(*sx.shape, ACTIVATION_BLOCK) * sx[..., None]).view(x.shape)  # (M, I)


def quantized_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x (M, I) times the quantized weight (O, P), or its tiles (T, 16 P) with scale (T, G, 16) ->
    (M, O) fp32, as the decode kernels compute it."""
    return product_activations(x, packed) @ dequantize(*rows(packed, scale, bits), bits).t()


def rows(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized weight in row layout whichever layout it is stored in (tiles: scale has a dim more)."""
    if scale.dim() == packed.dim() + 1:
        return untile(packed, bits), untile_scales(scale)
    return packed, scale


TILE = 16  # output rows per tile: one int32 lane each


def tile(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-packed (..., O, P) -> tiles (..., O / 16, 16 * P): the layout the decode kernels read
    (moegpt/kernels/qtiles.h). Each 64 bytes hold 16 output rows' values for the same inputs, one row
    per int32 lane: int8, 4 consecutive inputs per lane; int4, 8 per lane, inputs 8k..8k+3 in the low
    nibbles and 8k+4..8k+7 in the high ones. O must be a multiple of 16."""
    q = unpack(packed, bits)  # (..., O, I) int8
    *lead, O, I = q.shape
    step = 4 * 8 // bits  # inputs per lane
    u = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).reshape(*lead, O // TILE, TILE, I // step, step)
    u = u.transpose(-3, -2)  # (..., O/16, I/step, 16, step)
    if bits == 4:
        u = u[..., :4] | (u[..., 4:] << 4)
    return u.reshape(*lead, O // TILE, TILE * packed.shape[-1]).contiguous()


def untile(tiles: torch.Tensor, bits: int) -> torch.Tensor:
    """``tile``'s inverse: tiles (..., O / 16, 16 * P) -> row-packed (..., O, P)."""
    *lead, T, B = tiles.shape
    P = B // TILE
    I = P * 8 // bits
    step = 4 * 8 // bits
    u = tiles.reshape(*lead, T, I // step, TILE, 4)
    if bits == 4:
        u = torch.cat((u & 0xF, u >> 4), dim=-1)  # (..., T, I/8, 16, 8)
    q = (u.transpose(-3, -2).reshape(*lead, T * TILE, I).to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return pack(q, bits)


def tile_scales(scale: torch.Tensor) -> torch.Tensor:
    """(..., O, G) -> (..., O / 16, G, 16): a group's scales for the 16 rows of a tile side by side."""
    *lead, O, G = scale.shape
    return scale.reshape(*lead, O // TILE, TILE, G).transpose(-2, -1).contiguous()


def untile_scales(scale: torch.Tensor) -> torch.Tensor:
    *lead, T, G, _ = scale.shape
    return scale.transpose(-2, -1).reshape(*lead, T * TILE, G)
