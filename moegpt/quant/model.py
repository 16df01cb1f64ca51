"""Quantized weights in a plain model, applied from outside: each quantized weight is stored packed
(scheme.py) and read through a parametrization that dequantizes it, so the model's forward (prefill,
training-style evaluation) runs unchanged on the dequantized weight, one layer's worth at a time,
while the decode program (infer/decode.py) and its C++ kernels read the packed bytes and scales
themselves.

What is quantized (as gpt-fast's MoE quantizer and llm-compressor's Mixtral recipes do): the
attention projections, every expert's matrices (each expert with its own scales) and an untied LM
head. The router and the norms stay in full precision; the embedding table too, unless asked for
(llm-compressor's embedding recipe, llama.cpp's default): a lookup then dequantizes only the rows
it reads.

Legend: E experts, O out features, G groups per row, P packed bytes per row.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import moegpt.kernels as kernels
from moegpt.model.attention import Attention
from moegpt.model.experts import Experts, expert_mlp
from moegpt.quant.scheme import QuantScheme, dequantize, dequantize_rows, quantize, rows


class Dequantized(nn.Module):
    """A parametrization: packed (..., O, P) uint8 -> the weight (..., O, I) in ``dtype``. The packed
    bytes and scale may be in the decode kernels' tiles instead (scheme.tile: the scale has a dim
    more), once the decode program has laid them out so (infer/layout.py)."""

    def __init__(self, scale: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale)  # (..., O, G) fp32
        self.scheme = scheme
        self.dtype = dtype

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.values(packed, self.scale)

    def values(self, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``packed`` and ``scale`` (the whole weight's, or one expert's: packed[e], scale[e]) -> the
        weight in ``dtype``."""
        tiled = scale.dim() == packed.dim() + 1
        if tiled and self.dtype in (torch.float32, torch.bfloat16) and packed.device.type == "cpu" and kernels.available():
            # the tiles dequantized in one pass (bitwise the reference below, ~4x faster on `small`'s experts)
            return torch.ops.moegpt.dequantize_tiles(packed, scale, self.scheme.bits, self.dtype)
        return dequantize(*rows(packed, scale, self.scheme.bits), self.scheme.bits, self.dtype)

    def _apply(self, fn, recurse=True):
        """``model.to(device / dtype)``: the scales move but stay fp32 (a cast would round them); the
        dequantized weight takes the new dtype."""
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.scale.device))
        self.scale = self.scale.to(probe.device)
        self.dtype = probe.dtype
        return self


@dataclass(frozen=True)
class Target:
    """A weight that quantization applies to: ``module.attr``, named ``name`` in the state dict."""

    name: str  # e.g. layers.0.attn.wq.weight, layers.0.ffn.experts.w_gate
    module: nn.Module
    attr: str


EMBEDDING = "embed.weight"  # the token embedding table's name


def targets(model: nn.Module, embedding: bool = False) -> list[Target]:
    """The weights ``quantize_model`` quantizes, in state-dict order; the embedding table where it is
    quantized, or with ``embedding`` whether or not."""
    found = []
    table = getattr(model, "embed", None)
    if isinstance(table, nn.Embedding) and (embedding or is_quantized(table, "weight")):
        found.append(Target(EMBEDDING, table, "weight"))
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, Attention):
            found += [Target(f"{dot}{n}.weight", getattr(module, n), "weight") for n in ("wq", "wk", "wv", "wo")]
        elif isinstance(module, Experts):
            found += [Target(f"{dot}{n}", module, n) for n in ("w_gate", "w_up", "w_down") if has_weight(module, n)]
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        found.append(Target("lm_head.weight", head, "weight"))
    return found


def has_weight(module: nn.Module, attr: str) -> bool:
    """Whether ``module.attr`` holds a weight, stored plain or quantized (an Experts stack without a
    gate has none)."""
    return module._parameters.get(attr) is not None or is_quantized(module, attr)


def is_quantized(module: nn.Module, attr: str) -> bool:
    return parametrize.is_parametrized(module, attr) and isinstance(module.parametrizations[attr][0], Dequantized)


def stored(module: nn.Module, attr: str) -> tuple[torch.Tensor, Dequantized]:
    """(packed (..., O, P) uint8, its parametrization holding the scale) of a quantized weight."""
    p = module.parametrizations[attr]
    return p.original, p[0]


def row_packed(module: nn.Module, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (..., O, P), scale (..., O, G)) of a quantized weight in row layout, however it is stored."""
    packed, dq = stored(module, attr)
    return rows(packed, dq.scale, dq.scheme.bits)


def stored_tensors(module: nn.Module, attr: str) -> list[torch.Tensor]:
    """What holds ``module.attr``'s values: [the parameter], or [packed bytes, scale] when quantized
    (infer/layout.py fuses each of them with its neighbours')."""
    if is_quantized(module, attr):
        packed, dq = stored(module, attr)
        return [packed, dq.scale]
    return [getattr(module, attr)]


def attach(module: nn.Module, attr: str, packed: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme,
           dtype: torch.dtype) -> None:
    """Make ``module.attr`` the weight that ``packed`` and ``scale`` hold, read in ``dtype`` (an expert
    stack's forward then goes expert by expert: ``expert_by_expert``)."""
    if parametrize.is_parametrized(module, attr):
        raise ValueError(f"{type(module).__name__}.{attr} is quantized already")
    module._parameters[attr] = nn.Parameter(packed, requires_grad=False)
    parametrize.register_parametrization(module, attr, Dequantized(scale, scheme, dtype), unsafe=True)
    if isinstance(module, Experts):
        module.forward = types.MethodType(expert_by_expert, module)  # (bound: a deepcopy binds the copy)
    elif isinstance(module, nn.Embedding):
        module.forward = types.MethodType(quantized_lookup, module)


def quantized_lookup(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """A quantized embedding table's forward, ids (...) -> rows (..., D): only the rows looked up are
    dequantized (the whole table would be the model's largest tensor, in full precision, per call)."""
    packed, dq = stored(table, "weight")
    return dequantize_rows(packed, dq.scale, ids, dq.scheme.bits, dq.dtype)


def expert_weight(experts: Experts, name: str, e: int) -> torch.Tensor:
    """Expert e's matrix ``name`` (out, in), dequantized on its own if the stack is quantized."""
    if not is_quantized(experts, name):
        return getattr(experts, name)[e]
    packed, dq = stored(experts, name)
    return dq.values(packed[e], dq.scale[e])


def expert_by_expert(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A quantized stack's forward, x (A, D) grouped by expert, counts (E,) -> (A, D): each expert that
    has rows dequantized on its own (a few MB, which the allocator hands back the next time) and
    multiplied by its rows; the whole stack dequantized per forward would be tens of MB of fresh
    memory each time, whose page faults cost more than the dequantization (a quantized prefill)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(expert_mlp(x[start:start + n], lambda name: expert_weight(experts, name, e), experts.kind,
                                   F.linear))
            start += n
    return torch.cat(outs) if outs else x.new_zeros(x.shape)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme, embedding: bool = False) -> nn.Module:
    """Quantize every target weight of ``model`` in place (scales in the weight's own dtype, as a
    directory stores them), the embedding table too with ``embedding``; returns the model."""
    if embedding:
        if scheme.float8:
            raise ValueError("fp8 is for matmuls (GPUs' scaled products); quantize the embedding table as int8 or int4")
        if getattr(model, "lm_head", True) is None:
            raise ValueError("the model ties its LM head to the embedding table; quantizing the table is for "
                             "untied models")
    for t in targets(model, embedding):
        w = getattr(t.module, t.attr)
        packed, scale = quantize(w, scheme)
        attach(t.module, t.attr, packed, scale, scheme, w.dtype)
    return model


def model_scheme(model: nn.Module) -> QuantScheme | None:
    """The scheme of a quantized model (None: full precision); raises on a mix of schemes."""
    schemes = {stored(t.module, t.attr)[1].scheme for t in targets(model) if is_quantized(t.module, t.attr)}
    if len(schemes) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(s.name for s in schemes)}")
    return next(iter(schemes), None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take as stored (packed bytes and scales for quantized ones)."""
    scales = [m.scale for m in model.modules() if isinstance(m, Dequantized)]
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + scales)
