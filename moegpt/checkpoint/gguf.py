"""GGUF export: a model directory as one GGUF file, the format llama.cpp runs (``moegpt export``).

The model is written as llama.cpp's ``llama`` architecture with experts, the layout its converter
gives Mixtral (GGUF names; dims as ggml counts them, innermost first):

    token_embd.weight        (D, V)          output_norm.weight (D)      output.weight (D, V)
    blk.{i}.attn_norm.weight (D)             blk.{i}.ffn_norm.weight (D)
    blk.{i}.attn_q.weight    (D, H * Dh)     blk.{i}.attn_k.weight / attn_v.weight (D, G * Dh)
    blk.{i}.attn_output.weight (H * Dh, D)   blk.{i}.ffn_gate_inp.weight (D, E)   (the router)
    blk.{i}.ffn_gate_exps.weight / ffn_up_exps.weight (D, F, E)   blk.{i}.ffn_down_exps.weight (F, D, E)

llama.cpp rotates interleaved pairs of a head's dims (2j, 2j + 1) where moegpt (as HF) rotates
halves (j, j + Dh/2), so the rows of the q and k projections are reordered within each head
(``interleave_heads``), as llama.cpp's own converter does; the product is the same.

Matrices are written in one of ``TYPES``; norms and routers stay f32, as llama.cpp keeps them. Q8_0
and Q4_0 are ggml's: blocks of 32 inputs, each an fp16 scale and 32 int8 values (Q8_0: d = max|w| /
127, round(w / d), halves away from zero) or nibbles (Q4_0: d = the signed extreme over -8), computed
as ggml's reference computes them (``q8_0``, ``q4_0``), so the bytes are the gguf package's own
quantizer's (tested).

The file (GGUF version 3, little-endian): magic, version, tensor count, metadata count; the metadata
(key, type, value); each tensor's name, dims, type and offset; then the tensors' data, each aligned
to ALIGNMENT bytes. The tokenizer goes in as llama.cpp's ``gpt2`` byte-level BPE (moegpt's own
tokenizers and any GPT-2-style ``tokenizer.json``), with the chat template.

Legend: V vocab, D d_model, H query heads, G kv heads, Dh head dim, F d_ff, E experts.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moegpt.atomic import write_atomic
from moegpt.checkpoint.model_dir import load
from moegpt.config import MLPKind, ModelConfig, RopeType
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import MoEGPT

ALIGNMENT = 32
VERSION = 3
QK8_0 = 32  # inputs per Q8_0 block
# a matrix type -> (ggml type id, llama.cpp's file type id)
TYPES = {"f32": (0, 0), "f16": (1, 1), "q8_0": (8, 7), "q4_0": (2, 2), "bf16": (30, 32)}
BLOCKED = ("q8_0", "q4_0")  # types quantizing rows in blocks of 32 inputs
F32 = 0
# GGUF metadata value types
U8, I8, U16, I16, U32, I32, FLOAT32, BOOL, STRING, ARRAY, U64, I64, FLOAT64 = range(13)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER = 1, 3, 4  # llama.cpp's token types


def interleave_heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """w (n_heads * Dh, D), rows of each head in halves (HF rope) -> rows in interleaved pairs
    (llama.cpp's): row 2j of a head is its row j, row 2j + 1 its row j + Dh/2."""
    rows, D = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, D).transpose(1, 2).reshape(rows, D)


def q8_0(w: torch.Tensor) -> bytes:
    """w (..., I), I a multiple of 32 -> ggml's Q8_0 blocks: per 32 inputs, the fp16 scale then the
    32 int8 values (the reference's rounding: scale and products in fp32, halves away from zero)."""
    x = w.float().reshape(-1, QK8_0)  # (blocks, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    v = x * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    a = v.abs()
    whole = a.floor()
    q = torch.sign(v) * (whole + (2 * (a - whole)).floor())
    blocks = torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)  # (blocks, 34)
    return blocks.numpy().tobytes()


def q4_0(w: torch.Tensor) -> bytes:
    """w (..., I), I a multiple of 32 -> ggml's Q4_0 blocks: per 32 inputs, the fp16 scale d (the
    block's value of largest magnitude, signed, over -8) then 16 bytes, the low nibbles holding inputs
    0-15 and the high ones 16-31, each trunc(w / d + 8.5) clipped to 15 (the reference's rounding)."""
    x = w.float().reshape(-1, QK8_0)  # (blocks, 32)
    d = x.gather(1, x.abs().argmax(dim=1, keepdim=True)) / -8  # (the first of equal magnitudes, as ggml)
    q = (x * torch.where(d == 0, torch.zeros_like(d), 1 / d) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    blocks = torch.cat([d.half().view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)], dim=1)  # (blocks, 18)
    return blocks.numpy().tobytes()


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # ggml's order: innermost first
    ggml_type: int
    nbytes: int
    data: Callable[[], bytes]  # made as the file is written: one tensor's bytes in memory at a time


def _tensor(name: str, get: Callable[[], torch.Tensor], kind: str) -> Tensor:
    """The weight ``get()`` (..., I) in matrix type ``kind`` (a vector: f32)."""
    shape = tuple(get().shape)  # (a quantized stack is dequantized again when written)
    numel = math.prod(shape)
    if len(shape) == 1 or kind == "f32":
        ggml_type, nbytes, encode = F32, numel * 4, lambda w: w.float().numpy().tobytes()
    elif kind in BLOCKED:
        ggml_type, encode = TYPES[kind][0], q8_0 if kind == "q8_0" else q4_0
        nbytes = numel // QK8_0 * (2 + (QK8_0 if kind == "q8_0" else QK8_0 // 2))
    else:
        dtype = torch.float16 if kind == "f16" else torch.bfloat16
        ggml_type, nbytes = TYPES[kind][0], numel * 2
        encode = lambda w: w.to(dtype).view(torch.uint16).numpy().tobytes()  # noqa: E731
    return Tensor(name, tuple(reversed(shape)), ggml_type, nbytes, lambda: encode(get().detach().cpu().contiguous()))


def model_tensors(model: MoEGPT, kind: str) -> list[Tensor]:
    """The model's weights under llama.cpp's names, matrices in ``kind`` (q and k rows interleaved)."""
    cfg = model.cfg

    def read(module: nn.Module, attr: str) -> Callable[[], torch.Tensor]:
        return lambda: getattr(module, attr)

    out = [_tensor("token_embd.weight", read(model.embed, "weight"), kind)]
    for i, block in enumerate(model.layers):
        p = f"blk.{i}."
        attn, ffn = block.attn, block.ffn
        out += [_tensor(p + "attn_norm.weight", read(block.attn_norm, "weight"), kind),
                _tensor(p + "attn_q.weight", lambda a=attn: interleave_heads(a.wq.weight, cfg.n_heads), kind),
                _tensor(p + "attn_k.weight", lambda a=attn: interleave_heads(a.wk.weight, cfg.n_kv_heads), kind),
                _tensor(p + "attn_v.weight", read(attn.wv, "weight"), kind),
                _tensor(p + "attn_output.weight", read(attn.wo, "weight"), kind),
                _tensor(p + "ffn_norm.weight", read(block.ffn_norm, "weight"), kind),
                _tensor(p + "ffn_gate_inp.weight", read(ffn.router, "weight"), "f32"),
                _tensor(p + "ffn_gate_exps.weight", read(ffn.experts, "w_gate"), kind),
                _tensor(p + "ffn_up_exps.weight", read(ffn.experts, "w_up"), kind),
                _tensor(p + "ffn_down_exps.weight", read(ffn.experts, "w_down"), kind)]
    out.append(_tensor("output_norm.weight", read(model.norm, "weight"), kind))
    if model.lm_head is not None:  # tied: llama.cpp reads token_embd as the head when output is absent
        out.append(_tensor("output.weight", read(model.lm_head, "weight"), kind))
    return out


def check_exportable(cfg: ModelConfig, kind: str) -> None:
    """One-line errors for what this exporter (llama.cpp's llama architecture) cannot write."""
    if kind not in TYPES:
        raise ValueError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    if cfg.mlp != MLPKind.SWIGLU or cfg.moe_every != 1:
        raise ValueError("GGUF export writes models whose every layer is a SwiGLU MoE (llama.cpp's llama architecture "
                         f"with experts); this one has mlp={cfg.mlp.value!r}, moe_every={cfg.moe_every}")
    if cfg.rope_scaling is not None and cfg.rope_scaling.type != RopeType.LINEAR:
        raise ValueError(f"GGUF export writes linear rope scaling only; this model has {cfg.rope_scaling.type.value}")
    if kind in BLOCKED:
        for name, width in (("d_model", cfg.d_model), ("d_ff", cfg.d_ff), ("n_heads * head_dim", cfg.q_dim)):
            if width % QK8_0:
                raise ValueError(f"--type {kind} quantizes rows in blocks of {QK8_0}: {name} = {width} is not a multiple")


def model_metadata(cfg: ModelConfig, kind: str, name: str) -> list[tuple[str, int, object]]:
    """llama.cpp's hyper-parameter keys for the llama architecture, with the types it reads them as."""
    a = "llama."
    meta = [("general.architecture", STRING, "llama"), ("general.name", STRING, name),
            ("general.file_type", U32, TYPES[kind][1]), ("general.alignment", U32, ALIGNMENT),
            (a + "vocab_size", U32, cfg.vocab_size), (a + "context_length", U32, cfg.max_seq_len),
            (a + "embedding_length", U32, cfg.d_model), (a + "block_count", U32, cfg.n_layers),
            (a + "feed_forward_length", U32, cfg.d_ff), (a + "attention.head_count", U32, cfg.n_heads),
            (a + "attention.head_count_kv", U32, cfg.n_kv_heads),
            (a + "attention.key_length", U32, cfg.head_dim), (a + "attention.value_length", U32, cfg.head_dim),
            (a + "rope.dimension_count", U32, cfg.head_dim), (a + "rope.freq_base", FLOAT32, cfg.rope_theta),
            (a + "attention.layer_norm_rms_epsilon", FLOAT32, cfg.norm_eps),
            (a + "expert_count", U32, cfg.n_experts), (a + "expert_used_count", U32, cfg.top_k)]
    if cfg.rope_scaling is not None:
        meta += [(a + "rope.scaling.type", STRING, "linear"), (a + "rope.scaling.factor", FLOAT32, cfg.rope_scaling.factor)]
        if cfg.rope_scaling.original_max_seq_len is not None:
            meta.append((a + "rope.scaling.original_context_length", U32, cfg.rope_scaling.original_max_seq_len))
    return meta


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> list[tuple[str, int, object]]:
    """The vocabulary as llama.cpp's ``gpt2`` BPE: tokens by id (padded with unused control tokens to
    the model's ``vocab_size``, as llama.cpp wants one per logit), their types, the merges, the special
    ids and the chat template; refuses a tokenizer that is not byte-level BPE or is larger."""
    spec = json.loads(tok.to_json())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space") or spec.get("normalizer")):
        raise ValueError("GGUF export writes byte-level BPE tokenizers as GPT-2 splits text (as moegpt trains them: "
                         "no normalizer, no prefix space); this one is "
                         f"{model.get('type')!r} with a {pre.get('type')!r} pre-tokenizer"
                         + (", a normalizer" if spec.get("normalizer") else "")
                         + (", a prefix space" if pre.get("add_prefix_space") else ""))
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    added = {t["id"]: t.get("special", False) for t in spec.get("added_tokens", [])}
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    if None in tokens:
        raise ValueError(f"the tokenizer has no token with id {tokens.index(None)}: GGUF lists one per id")
    tokens += [f"<|unused_{i}|>" for i in range(tok.vocab_size, vocab_size)]
    # llama.cpp's types: special added tokens (and the padding) are control, other added ones user-defined
    types = [TOKEN_CONTROL if added.get(i, i >= tok.vocab_size) else TOKEN_USER if i in added else TOKEN_NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = [("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "gpt-2"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            ("tokenizer.ggml.token_type", ARRAY, (I32, types)),
            ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
            ("tokenizer.ggml.add_bos_token", BOOL, False), ("tokenizer.ggml.add_eos_token", BOOL, False)]
    for key, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
        if token_id is not None:
            meta.append((f"tokenizer.ggml.{key}_token_id", U32, token_id))
    if tok.chat_template:
        meta.append(("tokenizer.chat_template", STRING, tok.chat_template))
    return meta


_SCALARS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", FLOAT32: "<f", BOOL: "<?",
            U64: "<Q", I64: "<q", FLOAT64: "<d"}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(kind: int, value) -> bytes:
    if kind == STRING:
        return _string(value)
    if kind == ARRAY:
        item, values = value
        return struct.pack("<IQ", item, len(values)) + b"".join(_value(item, v) for v in values)
    return struct.pack(_SCALARS[kind], value)


def write_gguf(path: str | Path, metadata: list[tuple[str, int, object]], tensors: list[Tensor]) -> int:
    """Write the file (atomically): header, metadata, tensor infos, then each tensor's data, aligned;
    returns its size in bytes."""
    head = [b"GGUF", struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    head += [_string(key) + struct.pack("<I", kind) + _value(kind, value) for key, kind, value in metadata]
    offset = 0
    for t in tensors:
        head.append(_string(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
                    + struct.pack("<IQ", t.ggml_type, offset))
        offset += t.nbytes + -t.nbytes % ALIGNMENT
    header = b"".join(head)
    header += b"\0" * (-len(header) % ALIGNMENT)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            for t in tensors:
                data = t.data()
                assert len(data) == t.nbytes, (t.name, len(data), t.nbytes)
                f.write(data)
                f.write(b"\0" * (-len(data) % ALIGNMENT))

    write_atomic(path, write)
    return len(header) + offset


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "q8_0") -> int:
    """Write ``model_dir`` (a text model directory, full precision or quantized: dequantized first) as
    the GGUF file ``out`` with matrices in ``kind``; returns the file's size in bytes."""
    loaded = load(model_dir)
    if not isinstance(loaded.model, MoEGPT):
        raise ValueError(f"{model_dir} is a vision model: GGUF export writes text models")
    if loaded.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: GGUF files carry theirs")
    cfg = loaded.model.cfg
    check_exportable(cfg, kind)
    metadata = (model_metadata(cfg, kind, Path(model_dir).resolve().name)
                + tokenizer_metadata(loaded.tokenizer, cfg.vocab_size))
    with torch.no_grad():
        return write_gguf(out, metadata, model_tensors(loaded.model, kind))
