"""The decode program: one new token per sequence through the whole model, as plain functions over
fused weight views (gpt-fast's ``decode_one_token``), beside the plain model rather than inside it.

The runner uses it for a step in which every sequence has one query token (the steady state of
decoding); prefill chunks and speculative verification keep the model's forward. It reads:

- ``DecodeWeights``: views of the model's own parameters, fused by layout.py (one q|k|v product,
  one gate|up product per expert), so the model, HF conversion and TP sharding see the same names
  and values;
- a rope table built once for every position;
- the paged KV cache, with MQA/GQA attention that folds each KV head's query heads into rows of one
  product against that head's keys;
- a few-token MoE: top-k of the router's probabilities, then only the chosen experts' matrices (no
  Python loop over experts, no host sync).

On a CPU the few-row products and the MoE's expert products run on C++ kernels (moegpt.kernels:
``gemv``, ``expert_gemv``, which read each chosen expert's matrices where they are); everywhere else,
and without a compiler, the same program runs on PyTorch ops (``mm``/``linear``, and one
``grouped_mm`` over the assignments grouped by expert), which is also the kernels' oracle.

Legend: B sequences (one new token each), D d_model, H query heads, G kv heads, R = H/G query
heads per kv head, Dh head dim, S keys (the longest sequence's; shorter ones masked), E experts,
K top-k, A = B*K assignments, F d_ff, V vocab, Lm MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegpt.config import MLPKind, ModelConfig
from moegpt.infer.layout import fused_view, lay_out_for_decoding
from moegpt.kernels import expert_gemv_applies, gemv_applies
from moegpt.model import MoEGPT
from moegpt.model.grouped import grouped_mm_supported
from moegpt.model.layers import rms_norm, rope_cos_sin


class Matrix:
    """A weight the program multiplies rows by: x (M, I) -> (M, O). A few rows on a CPU: the C++
    matrix-vector kernel (moegpt.kernels); otherwise, stored (in, out), one ``mm`` with its transpose
    (no ``t`` dispatched per call), stored (out, in), ``F.linear``."""

    __slots__ = ("w", "w_io")

    def __init__(self, w: torch.Tensor):
        self.w = w  # (O, I), a view of the model's parameter
        self.w_io = w.t() if w.stride(0) == 1 and w.stride(1) != 1 else None  # (I, O) contiguous rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if gemv_applies(x, self.w):
            return torch.ops.moegpt.gemv(x, self.w)
        return torch.mm(x, self.w_io) if self.w_io is not None else F.linear(x, self.w)


KERNEL_ASSIGNMENTS = 4  # the MoE kernel for up to this many assignments per expert on average (B*K / E)


@dataclass(frozen=True, kw_only=True)
class LayerWeights:
    attn_norm: torch.Tensor  # (D,)
    wqkv: Matrix  # ((H + 2G) * Dh, D): the fused q|k|v rows
    wo: Matrix  # (D, H * Dh)
    ffn_norm: torch.Tensor  # (D,)
    router: Matrix | None  # (E, D); None for a dense layer (one expert that every token goes to)
    w_in: torch.Tensor  # (E, 2F, D) the fused gate|up (SwiGLU), or (E, F, D) up (GELU)
    w_down: torch.Tensor  # (E, D, F)
    w_in_t: torch.Tensor  # (E, D, 2F): w_in transposed, for grouped_mm
    w_down_t: torch.Tensor  # (E, F, D)


@dataclass(frozen=True, kw_only=True)
class DecodeWeights:
    cfg: ModelConfig
    embed: torch.Tensor  # (V, D)
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # (D,)
    head: Matrix  # (V, D)
    rope_cos: torch.Tensor  # (max_seq_len, Dh), in the model's dtype
    rope_sin: torch.Tensor  # (max_seq_len, Dh): -sin on the first half, sin on the second (see ``rope``)


@torch.no_grad()
def decode_weights(model: MoEGPT) -> DecodeWeights:
    """The decode program's views of ``model``'s parameters (fusing them in place first, idempotent)."""
    lay_out_for_decoding(model)
    cfg = model.cfg
    layers = []
    for block in model.layers:
        attn, ffn = block.attn, block.ffn
        experts = ffn.experts if hasattr(ffn, "experts") else ffn.mlp  # MoE, or a dense layer's one expert
        w_in = experts.w_up if experts.w_gate is None else fused_view([experts.w_gate, experts.w_up], 1)
        layers.append(LayerWeights(
            attn_norm=block.attn_norm.weight,
            wqkv=Matrix(fused_view([attn.wq.weight, attn.wk.weight, attn.wv.weight], 0)),
            wo=Matrix(attn.wo.weight), ffn_norm=block.ffn_norm.weight,
            router=Matrix(ffn.router.weight) if hasattr(ffn, "router") else None,
            w_in=w_in, w_down=experts.w_down, w_in_t=w_in.transpose(-2, -1), w_down_t=experts.w_down.transpose(-2, -1)))
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    cos, sin = rope_cos_sin(torch.arange(cfg.max_seq_len, device=device), cfg.head_dim, cfg.rope_theta)
    half = cfg.head_dim // 2
    sin[:, :half].neg_()  # the rotation's sign folded into the table: rope is x*cos + roll(x)*sin
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return DecodeWeights(cfg=cfg, embed=model.embed.weight, layers=tuple(layers), norm=model.norm.weight,
                         head=Matrix(head), rope_cos=cos.to(dtype), rope_sin=sin.to(dtype))


@dataclass(frozen=True, kw_only=True)
class DecodeMeta:
    """Where a decode step's keys go and come from."""

    slot_mapping: torch.Tensor  # (B,) slot of each sequence's new key/value
    key_slots: torch.Tensor  # (B * S,) slots of every sequence's keys by position, padded with slot 0
    mask: torch.Tensor | None  # (B, 1, 1, S) additive: 0 where a key exists, -inf on padding; None: none


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, n, Dh) rotated by each row's position; cos/signed_sin (B, 1, Dh), the sine negated on the
    first half. The model's apply_rope computes x*cos + cat(-x2, x1)*sin; roll(x) = cat(x2, x1), and
    (-a)*b == a*(-b) exactly, so these are the same numbers in two fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attend(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
    """q (B, H, Dh) against each sequence's cached keys -> (B, H * Dh). The R query heads that share a
    kv head are rows of one product against its keys (MQA: all H heads against the one head)."""
    B, H, Dh = q.shape
    G = k_slots.shape[1]
    S = meta.key_slots.shape[0] // B
    # Gathered into a padded batch here; a fused kernel reads the blocks where they are.
    keys, values = k_slots.index_select(0, meta.key_slots), v_slots.index_select(0, meta.key_slots)  # (B*S, G, Dh)
    if G == 1:  # MQA: (B, S, 1, Dh) is already (B, 1, S, Dh) in memory
        keys, values = keys.view(B, 1, S, Dh), values.view(B, 1, S, Dh)
    else:
        keys, values = keys.view(B, S, G, Dh).transpose(1, 2), values.view(B, S, G, Dh).transpose(1, 2)  # (B, G, S, Dh)
    out = F.scaled_dot_product_attention(q.view(B, G, H // G, Dh), keys, values, attn_mask=meta.mask)  # (B, G, R, Dh)
    return out.reshape(B, H * Dh)


def expert_products(x: torch.Tensor, w_t: torch.Tensor, expert: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (A, I) rows grouped by expert (``offs``: (E,) end of each group), w_t (E, I, O) the experts'
    transposed matrices -> (A, O): each row times its own expert's matrix; the experts no row chose
    are never read."""
    if grouped_mm_supported(x, w_t):  # (its checks are the same for a matrix and its transpose)
        return F.grouped_mm(x, w_t, offs=offs)
    return torch.bmm(x[:, None], w_t.index_select(0, expert))[:, 0]  # gathers the chosen matrices


def activation(up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(A, 2F) gate|up -> silu(gate) * up, or (A, F) -> gelu(up): (A, F)."""
    Fd = cfg.d_ff
    return F.silu(up[:, :Fd]) * up[:, Fd:] if cfg.mlp == MLPKind.SWIGLU else F.gelu(up, approximate="tanh")


def moe_with_kernels(h: torch.Tensor, lw: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The few-token MoE on the C++ kernel: each assignment times its chosen expert's matrices read
    where they are (no grouping in Python, no copy of a weight). h (B, D) -> (B, D), counts (E,)."""
    B, D = h.shape
    K = cfg.top_k
    probs = torch.softmax(lw.router(h), dim=-1, dtype=torch.float32)  # (B, E), as the model routes
    top_w, top_e = torch.topk(probs, K, dim=-1)  # (B, K)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    expert = top_e.view(-1)  # (A,) token-major
    routed = h.repeat_interleave(K, dim=0)  # (A, D)
    y = torch.ops.moegpt.expert_gemv(activation(torch.ops.moegpt.expert_gemv(routed, lw.w_in, expert), cfg),
                                     lw.w_down, expert)  # (A, D)
    y = y.view(B, K, D) * top_w[..., None]  # fp32 routing weights, as the model
    out = y.sum(dim=1)  # (B, D): each token's K rows, in the model's order
    return out if out.dtype == h.dtype else out.to(h.dtype), torch.bincount(expert, minlength=cfg.n_experts)


def moe(h: torch.Tensor, lw: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (B, D) -> (B, D), and the tokens routed to each expert (E,) (None for a dense layer)."""
    B, D = h.shape
    K = cfg.top_k
    if lw.router is not None and B * K <= KERNEL_ASSIGNMENTS * cfg.n_experts and expert_gemv_applies(h, lw.w_in):
        return moe_with_kernels(h, lw, cfg)
    if lw.router is None:  # dense: one expert, every token
        routed, weight, token, counts = h, None, None, None
        offs = torch.full((1,), B, dtype=torch.int32, device=h.device)
        expert = torch.zeros(B, dtype=torch.long, device=h.device)
    else:  # as the model routes (moe.route): softmax over all E in fp32, top-k, renormalised
        probs = torch.softmax(lw.router(h), dim=-1, dtype=torch.float32)  # (B, E)
        top_w, top_e = torch.topk(probs, K, dim=-1)  # (B, K)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        expert, order = torch.sort(top_e.view(-1), stable=True)  # (A,): assignments grouped by expert
        counts = torch.bincount(expert, minlength=cfg.n_experts)  # (E,)
        offs = counts.cumsum(0, dtype=torch.int32)
        token = order // K  # (A,) source token of each assignment
        routed, weight = h.index_select(0, token), top_w.view(-1).index_select(0, order)  # (A, D), (A,)
    up = expert_products(routed, lw.w_in_t, expert, offs)  # (A, 2F) or (A, F)
    y = expert_products(activation(up, cfg), lw.w_down_t, expert, offs)  # (A, D)
    if weight is None:
        return y, None
    y = y * weight[:, None]  # fp32 routing weights, as the model
    if y.dtype != h.dtype:
        y = y.to(h.dtype)
    # each token's K rows summed (for K=2 exactly the model's sum, whatever the order)
    return h.new_zeros(B, D).index_add_(0, token, y), counts


@torch.no_grad()
def decode_step(w: DecodeWeights, tokens: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
                v_cache: list[torch.Tensor], meta: DecodeMeta) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokens (B,) at ``positions`` (B,), one per sequence; the layers' paged caches (slots, G, Dh)
    -> logits (B, V) and the tokens routed to each expert (Lm, E) (None without MoE layers)."""
    cfg = w.cfg
    H, G, Dh, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
    B = tokens.shape[0]
    x = w.embed.index_select(0, tokens)  # (B, D)
    cos = w.rope_cos.index_select(0, positions)[:, None]  # (B, 1, Dh)
    sin = w.rope_sin.index_select(0, positions)[:, None]
    counts = []
    for lw, kc, vc in zip(w.layers, k_cache, v_cache):
        qkv = lw.wqkv(rms_norm(x, lw.attn_norm, eps)).view(B, H + 2 * G, Dh)  # (B, H+2G, Dh)
        qk = rope(qkv[:, :H + G], cos, sin)  # q and k rotated together
        v = qkv[:, H + G:]  # (B, G, Dh)
        kc.index_copy_(0, meta.slot_mapping, qk[:, H:].to(kc.dtype))  # (B, G, Dh) into their slots
        vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        x = x + lw.wo(attend(qk[:, :H], kc, vc, meta))
        y, c = moe(rms_norm(x, lw.ffn_norm, eps), lw, cfg)
        x = x + y
        if c is not None:
            counts.append(c)
    logits = w.head(rms_norm(x, w.norm, eps))  # (B, V)
    return logits, torch.stack(counts) if counts else None
