"""Weight layout for decoding: fused q|k|v and gate|up buffers, and on a CPU in fp32 without moegpt's
C++ kernels every matmul weight stored (in, out).

Fused buffers: each attention's wq, wk and wv become views of one ((H+2G)*Dh, D) tensor, and each
SwiGLU expert stack's w_gate and w_up views of one (E, 2F, D) tensor, so the decode program
(decode.py) runs one product where the model runs two or three, on the same parameters.

Decoding one token multiplies each weight matrix by one row, a matrix-vector product as fast as the
memory bandwidth it reaches. nn.Linear stores a weight (out, in) and computes x @ W.T; on a CPU in
fp32 the same product reads faster from a weight stored (in, out), because the kernel then streams
whole rows of W instead of dotting many short rows at once. Measured on a 2-core EPYC (2 threads,
weights cold in memory, best of 7): the (32000, 768) LM head 5.7 -> 3.6 ms per token (1.6x), a
(768, 768) projection 145 -> 128 us, a (1024, 768) expert matrix 193 -> 168 us; 16 and 128 rows
run at the same speed either way. The experts' grouped_mm (batches of E rows and more) runs ~20%
faster from it at 16-32 rows and 3-7% slower at 128-2048 (prefill). In bf16 on a CPU without bf16
units a transposed weight is 20x slower, so only fp32 CPU weights are laid out. moegpt's C++
matrix-vector kernel (moegpt.kernels) reads (out, in) rows fastest (a (2048, 768) fp32 matrix at one
row: 1.07 of a paired 1 GiB sum, vs 0.6-0.7 from (in, out)), so where it is built the layout stays
nn.Linear's.

The model is changed in place: each parameter keeps its name, shape and values but becomes a view
(of a fused buffer, and/or the transposed view of a contiguous (in, out) tensor). The model computes exactly as before, and moegpt's
``save`` writes the same files; code that needs contiguous parameters (``safetensors.save_file`` on
a raw state dict, ``.view`` on a weight) calls ``restore_layout`` first.

Legend: E experts, I in features, O out features.
"""

from __future__ import annotations

import torch
from torch import nn

import moegpt.kernels as kernels
from moegpt.model.attention import Attention
from moegpt.model.experts import Experts
from moegpt.quant.model import EMBEDDING, Target, has_weight, is_quantized, stored, stored_tensors, targets
from moegpt.quant.scheme import TILE, in_features, int8_activations, tile, tile_scales


def streams_rows_faster(w: torch.Tensor) -> bool:
    """Whether a matrix-vector product reads ``w`` faster stored (in, out): fp32 on a CPU where the
    decode program runs on PyTorch's kernels (moegpt's own matrix-vector kernel reads (out, in) rows
    faster, so with it every weight keeps nn.Linear's layout)."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and not kernels.available()


def store_in_by_out(w: torch.Tensor) -> torch.Tensor:
    """w (..., O, I) -> the same values as a (..., O, I) view of a contiguous (..., I, O) tensor."""
    return w.transpose(-2, -1).contiguous().transpose(-2, -1)


def matmul_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights the model multiplies activations by: nn.Linear weights and expert stacks, but not
    an embedding table (a lookup reads rows), even where a linear layer shares it (a tied head)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and not is_quantized(m, "weight")}
    weights = []
    for module in model.modules():  # (a quantized weight is bytes the kernels read as stored)
        if isinstance(module, nn.Linear) and not is_quantized(module, "weight"):
            weights.append(module.weight)
        elif isinstance(module, Experts):
            weights.extend(module._parameters[n] for n in ("w_gate", "w_up", "w_down")
                           if module._parameters.get(n) is not None)
    return [w for w in weights if id(w) not in tables]


def fused_groups(model: nn.Module) -> list[tuple[list[nn.Parameter], int]]:
    """(parameters, the dim they are stacked along) of every fused buffer: q|k|v of each attention
    (dim 0 of (out, in)), gate|up of each SwiGLU expert stack (dim 1 of (E, out, in)); for quantized
    weights, their packed bytes and their scales, each fused along the same dim."""
    groups = []
    for module in model.modules():
        if isinstance(module, Attention):
            parts = [stored_tensors(m, "weight") for m in (module.wq, module.wk, module.wv)]
            groups += [(list(tensors), 0) for tensors in zip(*parts)]
        elif isinstance(module, Experts) and has_weight(module, "w_gate"):
            parts = [stored_tensors(module, n) for n in ("w_gate", "w_up")]
            groups += [(list(tensors), 1) for tensors in zip(*parts)]
    return groups


def is_fused(params: list[nn.Parameter], dim: int) -> bool:
    """Whether ``params`` are consecutive slices of one buffer along ``dim`` (each starting where the
    previous one ends)."""
    first = params[0]
    offset = first.storage_offset()
    for p in params:
        if p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or p.stride() != first.stride() \
                or p.storage_offset() != offset:
            return False
        offset += p.shape[dim] * p.stride(dim)
    return True


def fused_view(params: list[nn.Parameter], dim: int) -> torch.Tensor:
    """The whole buffer that fused ``params`` are slices of, e.g. (H+2G)*Dh rows for q|k|v."""
    first = params[0]
    size = list(first.shape)
    size[dim] = sum(p.shape[dim] for p in params)
    return first.as_strided(size, first.stride(), first.storage_offset())


@torch.no_grad()
def fuse(params: list[nn.Parameter], dim: int) -> torch.Tensor:
    """Concatenate ``params`` along ``dim`` into one buffer (stored (in, out) where that reads faster)
    and make each a view of its slice, in place; returns the buffer (a no-op when already fused)."""
    if is_fused(params, dim):
        return fused_view(params, dim)
    whole = torch.cat([p.data for p in params], dim=dim)
    if streams_rows_faster(whole):
        whole = store_in_by_out(whole)
    start = 0
    for p in params:
        p.data = whole.narrow(dim, start, p.shape[dim])
        start += p.shape[dim]
    return whole


def products(model: nn.Module) -> list[Target]:
    """The quantization targets the model multiplies by: all but an embedding table (a lookup reads
    its rows as stored)."""
    return [t for t in targets(model) if t.name != EMBEDDING]


def tiles_apply(model: nn.Module) -> bool:
    """Whether the model's quantized weights go in the C++ kernels' tiles (quant/scheme.py: tile): on
    a CPU with the kernels, when every quantized weight has whole tiles of rows and int8 activations."""
    quantized = [stored(t.module, t.attr) for t in products(model) if is_quantized(t.module, t.attr)]
    if not quantized or quantized[0][0].device.type != "cpu" or not kernels.available():
        return False
    if any(p.dtype != torch.uint8 for p, _ in quantized):  # fp8 weights: scaled matmuls, not the integer kernels
        return False
    return all(dq.scale.dim() == p.dim() + 1 or  # tiled already
               (p.shape[-2] % TILE == 0 and int8_activations(in_features(p, dq.scheme.bits))) for p, dq in quantized)


@torch.no_grad()
def tile_quantized(model: nn.Module) -> None:
    """Each quantized weight's packed bytes and scales into tiles, in place (before fusing: the tiles of
    q|k|v or gate|up then fuse along the same dims as their rows)."""
    for t in products(model):
        if is_quantized(t.module, t.attr):
            packed, dq = stored(t.module, t.attr)
            if dq.scale.dim() == packed.dim():
                packed.data = tile(packed.data, dq.scheme.bits)
                dq.scale.data = tile_scales(dq.scale.data)


@torch.no_grad()
def lay_out_for_decoding(model: nn.Module) -> nn.Module:
    """Fuses q|k|v and gate|up, stores the model's matmul weights (in, out) where that decodes
    faster and quantized ones in the kernels' tiles; in place, idempotent, returns the model."""
    if tiles_apply(model):
        tile_quantized(model)
    for params, dim in fused_groups(model):
        fuse(params, dim)
    for w in matmul_weights(model):
        if streams_rows_faster(w) and w.is_contiguous():  # not contiguous: laid out already
            w.data = store_in_by_out(w.data)
    return model


@torch.no_grad()
def restore_layout(model: nn.Module) -> nn.Module:
    """Undoes ``lay_out_for_decoding``: every parameter contiguous again (same values); returns the model."""
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    return model
