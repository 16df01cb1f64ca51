"""The decode program: one new token per sequence through the whole model, as plain functions over
fused weight views (gpt-fast's ``decode_one_token``), beside the plain model rather than inside it.

The runner uses it for a step in which every sequence has one query token (the steady state of
decoding); prefill chunks and speculative verification keep the model's forward. It reads:

- ``DecodeWeights``: views of the model's own parameters, fused by layout.py (one q|k|v product,
  one gate|up product per expert), so the model, HF conversion and TP sharding see the same names
  and values;
- a rope table built once for every position;
- the step's metadata (decode_batch.py): positions and block tables in persistent buffers;
- the paged KV cache, with MQA/GQA attention that folds each KV head's query heads into rows of one
  product against that head's keys;
- a few-token MoE: top-k of the router's logits, then only the chosen experts' matrices (no
  Python loop over experts, no host sync).

On a CPU in fp32 or bf16 with up to KERNEL_ASSIGNMENTS assignments per expert, each layer is one C++
op (moegpt.kernels: ``decode_layer``, which reads the chosen experts' matrices and the paged keys
where they are), and the LM head a C++ matrix-vector product (``gemv``). Everywhere else, and
without a compiler, the same program runs on PyTorch ops (``layers_in_pytorch``: ``mm``, flash
attention over the keys gathered per layer, one ``grouped_mm`` over the assignments grouped by
expert), which is also the C++ op's oracle.

Legend: B sequences (one new token each), D d_model, H query heads, G kv heads, R = H/G query
heads per kv head, Dh head dim, S keys (the longest sequence's; shorter ones masked), E experts,
K top-k, A = B*K assignments, F d_ff, V vocab, Lm MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import MLPKind, ModelConfig
from moegpt.infer.decode_batch import DecodeMeta
from moegpt.infer.kv_quant import QuantizedSlots
from moegpt.infer.layout import fused_view, lay_out_for_decoding
from moegpt.infer.paged_cache import slots_by_position
from moegpt.kernels import MAX_ROWS_IN_BY_OUT, MAX_ROWS_OUT_BY_IN, decode_layer_applies, gemv_applies, qgemv_applies
from moegpt.model import MoEGPT
from moegpt.model.grouped import grouped_mm_supported
from moegpt.model.layers import rms_norm
from moegpt.model.rope import rope_cos_sin
from moegpt.quant.fp8 import E4M3, fp8_matmul
from moegpt.quant.model import has_weight, model_scheme, stored_tensors
from moegpt.quant.scheme import dequantize, dequantize_rows, product_activations, quantized_matmul, rows


LayerHook = Callable[[int, torch.Tensor], torch.Tensor]  # (decoder layer, x (B, D)) -> x (B, D)
ExpertFFN = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (rows, expert, ends) -> rows


class Collectives(Protocol):
    """What a rank of a sharded model does at a layer's seams (infer/sharded.py); None: one process."""

    splits_experts: bool  # whether the experts are divided over ranks (expert parallel)
    sums_experts: bool  # ... and each rank's experts' outputs summed over the ranks (one machine)

    def sum_partials(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: this rank's partial output (B, D) of attention or the FFN -> their sum."""
        ...

    def first_expert(self, n_experts: int) -> int:
        """Expert parallel: the first of this rank's experts among the router's ``n_experts``."""
        ...

    def sum_expert_partials(self, y: torch.Tensor) -> torch.Tensor:
        """``sums_experts``: this rank's share (B, D) of an MoE layer's output -> the whole."""
        ...

    def experts(self, rows: torch.Tensor, expert: torch.Tensor, ends: torch.Tensor, ffn: ExpertFFN) -> torch.Tensor:
        """Expert parallel: rows (A, D) grouped by expert (``expert`` (A,) each row's, ``ends`` (E,)
        where each group ends) -> (A, D), each row through its expert wherever that expert lives;
        ``ffn`` runs this rank's experts on rows grouped by local expert."""
        ...


class Matrix:
    """A weight the program multiplies rows by: x (M, I) -> (M, O). A few rows on a CPU: the C++
    matrix-vector kernel (moegpt.kernels); otherwise one ``mm`` with the weight's transpose, a view
    taken once (no ``t`` dispatched per call), whichever way the weight is stored. A quantized weight
    (moegpt.quant: packed bytes and fp32 scales): the C++ quantized product on a CPU, otherwise its
    oracle, quant.scheme.quantized_matmul (int8 activations times the weight dequantized in fp32)."""

    __slots__ = ("w", "w_t", "scale", "bits")

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None, bits: int = 0):
        self.w = w  # (O, I), a view of the model's parameter; quantized: (O, P) uint8
        self.w_t = w.t()  # (I, O)
        self.scale, self.bits = scale, bits  # (O, G) fp32, 8 or 4; None, 0: not quantized

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            if self.w.dtype == E4M3:  # fp8: one scaled matmul (fp8 tensor cores on a GPU)
                return fp8_matmul(x, self.w, self.scale).to(x.dtype)
            if qgemv_applies(x):
                return torch.ops.moegpt.qgemv(x, self.w, self.scale, self.bits)
            return quantized_matmul(x, self.w, self.scale, self.bits).to(x.dtype)
        if gemv_applies(x, self.w):
            return torch.ops.moegpt.gemv(x, self.w)
        return torch.mm(x, self.w_t)


class Table:
    """The embedding table the program looks tokens up in: tokens (B,) -> rows (B, D). Quantized
    (packed (V, P) bytes and fp32 scales (V, G), in rows): only the rows looked up are dequantized."""

    __slots__ = ("w", "scale", "bits", "dtype")

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None, bits: int = 0,
                 dtype: torch.dtype | None = None):
        self.w, self.scale, self.bits, self.dtype = w, scale, bits, dtype

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.w.index_select(0, tokens)
        return dequantize_rows(self.w, self.scale, tokens, self.bits, self.dtype)


KERNEL_ASSIGNMENTS = 8  # the C++ layer for up to this many assignments per expert on average (B*K / E):
# measured at batch 64 of small (8 per expert): 199 ms a step vs 292 in PyTorch ops
MAX_QUERY_TOKENS = 8  # a sequence's tokens in one decode-program step (a token and its draft tokens)


@dataclass(frozen=True, kw_only=True)
class LayerWeights:
    attn_norm: torch.Tensor  # (D,)
    wqkv: Matrix  # ((H + 2G) * Dh, D): the fused q|k|v rows
    wo: Matrix  # (D, H * Dh)
    ffn_norm: torch.Tensor  # (D,)
    router: Matrix | None  # (E, D); None for a dense layer (one expert that every token goes to)
    w_in: torch.Tensor  # (E, 2F, D) the fused gate|up (SwiGLU), or (E, F, D) up (GELU); quantized: (E, 2F, P)
    w_down: torch.Tensor  # (E, D, F); quantized: (E, D, P)
    w_in_t: torch.Tensor  # (E, D, 2F): w_in transposed, for grouped_mm
    w_down_t: torch.Tensor  # (E, F, D)
    expert_ids: torch.Tensor  # (E,) 1..E (every expert the router picks from, wherever it lives)
    w_in_scale: torch.Tensor | None = None  # (E, 2F, G) fp32 for quantized experts
    w_down_scale: torch.Tensor | None = None  # (E, D, G)
    bits: int = 0  # 8 or 4 for quantized weights


@dataclass(frozen=True, kw_only=True)
class DecodeWeights:
    cfg: ModelConfig
    embed: Table | None  # (V, D); None on a pipeline stage after the first
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # (D,)
    head: Matrix | None  # (V, D); None on a pipeline stage before the last
    rope_cos: torch.Tensor  # (max_seq_len, Dh), in the model's dtype
    rope_sin: torch.Tensor  # (max_seq_len, Dh): -sin on the first half, sin on the second (see ``rope``)


@torch.no_grad()
def decode_weights(model: MoEGPT) -> DecodeWeights:
    """The decode program's views of ``model``'s parameters (fusing them in place first, idempotent)."""
    lay_out_for_decoding(model)
    cfg = model.cfg
    bits = scheme.bits if (scheme := model_scheme(model)) is not None else 0
    dtype, device = model.norm.weight.dtype, model.norm.weight.device

    def matrix(*linears: nn.Linear) -> Matrix:  # one matrix (fused rows where several)
        parts = [fused_view(list(t), 0) for t in zip(*(stored_tensors(m, "weight") for m in linears))]
        return Matrix(parts[0], None if len(parts) == 1 else parts[1], bits if len(parts) == 2 else 0)

    def table(embedding: nn.Embedding) -> Table:
        w, *scale = stored_tensors(embedding, "weight")
        return Table(w, scale[0], bits, dtype) if scale else Table(w)

    layers = []
    for block in model.layers:
        attn, ffn = block.attn, block.ffn
        experts = ffn.experts if hasattr(ffn, "experts") else ffn.mlp  # MoE, or a dense layer's one expert
        names = ["w_gate", "w_up"] if has_weight(experts, "w_gate") else ["w_up"]
        w_in, *in_scale = [fused_view(list(t), 1) for t in zip(*(stored_tensors(experts, n) for n in names))]
        w_down, *down_scale = stored_tensors(experts, "w_down")
        layers.append(LayerWeights(
            attn_norm=block.attn_norm.weight, wqkv=matrix(attn.wq, attn.wk, attn.wv), wo=matrix(attn.wo),
            ffn_norm=block.ffn_norm.weight, router=Matrix(ffn.router.weight) if hasattr(ffn, "router") else None,
            w_in=w_in, w_down=w_down, w_in_t=w_in.transpose(-2, -1), w_down_t=w_down.transpose(-2, -1),
            expert_ids=torch.arange(1, (ffn.router.weight.shape[0] if hasattr(ffn, "router") else 1) + 1,
                                    device=w_in.device),
            w_in_scale=in_scale[0] if in_scale else None, w_down_scale=down_scale[0] if down_scale else None,
            bits=bits if in_scale else 0))
    # every position a sequence can reach; a dynamic scaling is fixed at max_seq_len (model/rope.py)
    cos, sin = rope_cos_sin(torch.arange(cfg.max_seq_len, device=device), cfg.head_dim, cfg.rope_theta,
                            cfg.rope_scaling, seq_len=cfg.max_seq_len)
    half = cfg.head_dim // 2
    sin[:, :half].neg_()  # the rotation's sign folded into the table: rope is x*cos + roll(x)*sin
    # a pipeline stage may hold neither the embedding (not the first) nor the head (not the last)
    embed = table(model.embed) if model.embed is not None else None
    head = (matrix(model.lm_head) if model.lm_head is not None
            else matrix(model.embed) if model.embed is not None else None)
    return DecodeWeights(cfg=cfg, embed=embed, layers=tuple(layers), norm=model.norm.weight,
                         head=head, rope_cos=cos.to(dtype), rope_sin=sin.to(dtype))


@dataclass(frozen=True, kw_only=True)
class GatheredKeys:
    """The pure-PyTorch program's view of a step's keys: every sequence's gathered into a padded batch."""

    slot_mapping: torch.Tensor  # (B,) slot of each sequence's new key/value
    key_slots: torch.Tensor  # (B * S,) slots of every sequence's keys by position, padded with block 0's
    mask: torch.Tensor | None  # (B, 1, 1, S) additive: 0 where a key exists, -inf on padding; None: none


def gathered_keys(meta: DecodeMeta, positions: torch.Tensor, dtype: torch.dtype) -> GatheredKeys:
    """From the block tables (B, nb): the slots of each sequence's keys up to S, the longest's."""
    B, S = len(meta.lens), max(meta.lens)
    slots = slots_by_position(meta.block_tables, meta.block_size, S)  # (B, S)
    slot_mapping = slots.gather(1, positions[:, None]).view(B)
    mask = None
    if min(meta.lens) != S:
        lens = torch.tensor(meta.lens, device=positions.device)
        missing = torch.arange(S, device=positions.device)[None, :] >= lens[:, None]  # (B, S)
        mask = torch.zeros(B, 1, 1, S, dtype=dtype, device=positions.device).masked_fill_(missing[:, None, None],
                                                                                          float("-inf"))
    return GatheredKeys(slot_mapping=slot_mapping, key_slots=slots.reshape(-1), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, n, Dh) rotated by each row's position; cos/signed_sin (B, 1, Dh), the sine negated on the
    first half. The model's apply_rope computes x*cos + cat(-x2, x1)*sin; roll(x) = cat(x2, x1), and
    (-a)*b == a*(-b) exactly, so these are the same numbers (to a rounding: addcmul rounds once) in
    three fewer ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def attend(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, meta: GatheredKeys) -> torch.Tensor:
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


def expert_products(x: torch.Tensor, w_t: torch.Tensor, expert: torch.Tensor, offs: torch.Tensor,
                    scale: torch.Tensor | None = None, bits: int = 0) -> torch.Tensor:
    """x (A, I) rows grouped by expert (``offs``: (E,) end of each group), w_t (E, I, O) the experts'
    transposed matrices -> (A, O): each row times its own expert's matrix; the experts no row chose
    are never read. Quantized (w_t (E, P, O) bytes, scale (E, O, G)): the chosen matrices
    dequantized in fp32 times the rows' int8 activations (the C++ layer's oracle)."""
    if scale is not None:
        w = dequantize(*rows(w_t.transpose(-2, -1).index_select(0, expert), scale.index_select(0, expert), bits),
                       bits)  # (A, O, I)
        return torch.bmm(product_activations(x, w_t)[:, None], w.transpose(-2, -1))[:, 0].to(x.dtype)
    if grouped_mm_supported(x, w_t):  # (its checks are the same for a matrix and its transpose)
        return F.grouped_mm(x, w_t, offs=offs)
    return torch.bmm(x[:, None], w_t.index_select(0, expert))[:, 0]  # gathers the chosen matrices


def activation(up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(A, 2F) gate|up -> silu(gate) * up, or (A, F) -> gelu(up): (A, F)."""
    if cfg.mlp != MLPKind.SWIGLU:
        return F.gelu(up, approximate="tanh")
    gate, up = up.split(cfg.d_ff, dim=1)
    return F.silu(gate) * up


def route(h: torch.Tensor, lw: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's routing (moe.route: softmax over all E in fp32, top-k, renormalised) in two ops:
    the top k of the logits are those of the probabilities, and the renormalised top-k
    probabilities are the softmax of the top-k logits. h (B, D) -> weights (B, K) fp32, experts (B, K)."""
    top_l, top_e = torch.topk(lw.router(h), cfg.top_k, dim=-1)  # (B, K)
    return torch.softmax(top_l, dim=-1, dtype=torch.float32), top_e


def moe(h: torch.Tensor, lw: LayerWeights, cfg: ModelConfig,
        comm: Collectives | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (B, D) -> (B, D), and where each expert's assignments end (E,) int32 among the assignments
    sorted by expert (None for a dense layer): the step's expert counts come from it. With ``comm``
    the chosen experts may live on other ranks (expert parallel)."""
    B, D = h.shape
    K = cfg.top_k
    if lw.router is None:  # dense: one expert, every token
        routed, weight, token = h, None, None
        ends = torch.full((1,), B, dtype=torch.int32, device=h.device)
        expert = torch.zeros(B, dtype=torch.long, device=h.device)
    else:
        top_w, top_e = route(h, lw, cfg)
        expert, order = torch.sort(top_e.view(-1), stable=True)  # (A,): assignments grouped by expert
        ends = torch.searchsorted(expert, lw.expert_ids, out_int32=True)  # (E,) end of each group
        token = order // K  # (A,) source token of each assignment
        routed, weight = h.index_select(0, token), top_w.view(-1, 1).index_select(0, order)  # (A, D), (A, 1)

    def ffn(rows: torch.Tensor, expert: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:  # (A, D) -> (A, D)
        up = expert_products(rows, lw.w_in_t, expert, ends, lw.w_in_scale, lw.bits)  # (A, 2F) or (A, F)
        return expert_products(activation(up, cfg), lw.w_down_t, expert, ends, lw.w_down_scale, lw.bits)

    y = ffn(routed, expert, ends) if comm is None or weight is None else comm.experts(routed, expert, ends, ffn)  # (A, D)
    if weight is None:
        return y, None
    y = y * weight  # fp32 routing weights, as the model
    if y.dtype != h.dtype:
        y = y.to(h.dtype)
    # each token's K rows summed (for K=2 exactly the model's sum, whatever the order)
    return h.new_zeros(B, D).index_add_(0, token, y), ends


WHOLE_LAYER, ATTENTION_PART, FFN_PART = 0, 1, 2  # decode_layer's ``part``


def layer_with_kernel(x: torch.Tensor, w: DecodeWeights, lw: LayerWeights, kc: torch.Tensor | QuantizedSlots,
                      vc: torch.Tensor | QuantizedSlots, positions: torch.Tensor, meta: DecodeMeta,
                      counts: torch.Tensor | None, row: int, part: int = WHOLE_LAYER,
                      first_expert: int = 0) -> torch.Tensor:
    """The whole layer as one C++ op (moegpt.kernels: ``decode_layer``), x (B, D) -> (B, D); the
    chosen experts' assignments added to counts[row] (E,). An 8-bit cache: its values and scales.
    ``part``: ATTENTION_PART or FFN_PART, that half's output alone (B, D) (a sharded rank's partial
    sum, for the caller to sum over ranks and add to x); ``first_expert``: the layer's experts are
    the router's [first_expert, first_expert + El) (an expert-parallel rank's), the others add zero."""
    cfg = w.cfg
    scales = (kc.scales, vc.scales) if isinstance(kc, QuantizedSlots) else (None, None)
    if isinstance(kc, QuantizedSlots):
        kc, vc = kc.values, vc.values
    return torch.ops.moegpt.decode_layer(
        x, lw.attn_norm, lw.wqkv.w, lw.wo.w, lw.ffn_norm, None if lw.router is None else lw.router.w, lw.w_in,
        lw.w_down, kc, vc, w.rope_cos, w.rope_sin, positions, meta.block_tables, meta.block_size, cfg.n_heads,
        cfg.top_k, cfg.mlp == MLPKind.SWIGLU, cfg.norm_eps, counts if lw.router is not None else None, row,
        MAX_ROWS_IN_BY_OUT, MAX_ROWS_OUT_BY_IN[x.dtype], lw.wqkv.scale, lw.wo.scale, lw.w_in_scale, lw.w_down_scale,
        lw.bits or lw.wqkv.bits, *scales, part, first_expert)


def kernel_layers_apply(w: DecodeWeights, x: torch.Tensor, k_cache: list[torch.Tensor]) -> bool:
    """Whether the step runs layer by layer on the C++ op: a CPU model in fp32 or bf16 (not fp8
    weights), its cache in the same dtype, and few enough assignments per expert (as for the MoE
    kernel)."""
    cfg = w.cfg
    return (x.shape[0] * cfg.top_k <= KERNEL_ASSIGNMENTS * cfg.n_experts
            and k_cache[0].dtype == x.dtype and w.layers[0].w_in.dtype != E4M3 and decode_layer_applies(x))


@torch.no_grad()
def decode_step(w: DecodeWeights, tokens: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
                v_cache: list[torch.Tensor], meta: DecodeMeta, logit_rows: torch.Tensor | None = None,
                before_layer: LayerHook | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokens (B,) at ``positions`` (B,), each a row with its sequence's block table in ``meta`` (a
    sequence may have several rows, at consecutive positions); the layers' paged caches (slots, G,
    Dh) -> logits (L, V) of ``logit_rows`` (L,) (None: every row) and the tokens routed to each
    expert (Lm, E) (None without MoE layers). ``before_layer(i, x)``: what runs on the rows before
    decoder layer i (a vision model's gated cross-attention)."""
    x = w.embed(tokens)  # (B, D)
    x, counts = decode_layers(w, x, positions, k_cache, v_cache, meta, before_layer)
    return decode_logits(w, x, logit_rows, fused=kernel_layers_apply(w, x, k_cache)), counts


def decode_layers(w: DecodeWeights, x: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
                  v_cache: list[torch.Tensor], meta: DecodeMeta, before_layer: LayerHook | None = None,
                  comm: Collectives | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder layers of ``w`` (all of a model's, or a pipeline stage's): x (B, D) -> (B, D) and
    the tokens routed to each expert of its MoE layers (Lm, E) (None without MoE layers)."""
    if not kernel_layers_apply(w, x, k_cache):
        return layers_in_pytorch(w, x, positions, k_cache, v_cache, meta, before_layer, comm)
    cfg = w.cfg
    n_moe = sum(lw.router is not None for lw in w.layers)
    counts = torch.zeros(n_moe, cfg.n_experts, dtype=torch.long) if n_moe else None  # CPU
    row = 0
    for i, (lw, kc, vc) in enumerate(zip(w.layers, k_cache, v_cache)):
        if before_layer is not None:
            x = before_layer(i, x)
        if comm is None:
            x = layer_with_kernel(x, w, lw, kc, vc, positions, meta, counts, row)
        else:  # a sharded rank: each half's output summed over the ranks between the halves
            x = x + comm.sum_partials(layer_with_kernel(x, w, lw, kc, vc, positions, meta, counts, row, ATTENTION_PART))
            if comm.splits_experts and lw.router is not None and comm.sums_experts:  # its experts' share
                y = comm.sum_expert_partials(layer_with_kernel(x, w, lw, kc, vc, positions, meta, counts, row,
                                                               FFN_PART, comm.first_expert(cfg.n_experts)))
            elif comm.splits_experts and lw.router is not None:  # rows to the experts' ranks: PyTorch's MoE
                y, ends = moe(rms_norm(x, lw.ffn_norm, cfg.norm_eps), lw, cfg, comm)
                y = comm.sum_partials(y)
                counts[row] += torch.diff(ends, prepend=ends.new_zeros(1)).cpu()
            else:
                y = comm.sum_partials(layer_with_kernel(x, w, lw, kc, vc, positions, meta, counts, row, FFN_PART))
            x = x + y
        row += lw.router is not None
    return x, counts


def decode_logits(w: DecodeWeights, x: torch.Tensor, logit_rows: torch.Tensor | None = None,
                  fused: bool = False) -> torch.Tensor:
    """The final norm and the head on the rows asked for: x (B, D) -> logits (L, V). ``fused``: the
    norm as the C++ op (the layers ran on it)."""
    if logit_rows is not None:
        x = x.index_select(0, logit_rows)  # (L, D)
    h = torch.ops.moegpt.rms_norm(x, w.norm, w.cfg.norm_eps) if fused else rms_norm(x, w.norm, w.cfg.norm_eps)
    return w.head(h)  # (L, V)


def layers_in_pytorch(w: DecodeWeights, x: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
                      v_cache: list[torch.Tensor], meta: DecodeMeta, before_layer: LayerHook | None = None,
                      comm: Collectives | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers in PyTorch ops (the C++ op's oracle): x (B, D) -> (B, D), counts (Lm, E) or None.
    ``comm``: a sharded model's collectives (partial outputs summed, experts on other ranks)."""
    cfg = w.cfg
    H, G, Dh, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
    B = x.shape[0]
    keys = gathered_keys(meta, positions, x.dtype)
    cos = w.rope_cos.index_select(0, positions)[:, None]  # (B, 1, Dh)
    sin = w.rope_sin.index_select(0, positions)[:, None]
    ends = []
    for i, (lw, kc, vc) in enumerate(zip(w.layers, k_cache, v_cache)):
        if before_layer is not None:
            x = before_layer(i, x)
        qkv = lw.wqkv(rms_norm(x, lw.attn_norm, eps)).view(B, H + 2 * G, Dh)  # (B, H+2G, Dh)
        qk = rope(qkv[:, :H + G], cos, sin)  # q and k rotated together
        v = qkv[:, H + G:]  # (B, G, Dh)
        kc.index_copy_(0, keys.slot_mapping, qk[:, H:].to(kc.dtype))  # (B, G, Dh) into their slots
        vc.index_copy_(0, keys.slot_mapping, v.to(vc.dtype))
        out = lw.wo(attend(qk[:, :H], kc, vc, keys))  # (B, D)
        x = x + (out if comm is None else comm.sum_partials(out))
        y, offs = moe(rms_norm(x, lw.ffn_norm, eps), lw, cfg, comm)
        x = x + (y if comm is None else comm.sum_partials(y))
        if offs is not None:
            ends.append(offs)
    if not ends:
        return x, None
    ends = torch.stack(ends)  # (Lm, E)
    return x, torch.diff(ends, dim=1, prepend=ends.new_zeros(len(ends), 1)).long()  # (Lm, E) counts
