"""The fused C++ decode layer (torch.ops.moegpt.decode_layer) against its oracle, the decode program
in PyTorch ops (infer/decode.py: layers_in_pytorch), over batch sizes, block sizes, contexts (past
the op's 64-key chunks), attention shapes and dtypes; keys in scattered blocks of the paged cache."""

import pytest
import torch

import moegpt.infer.decode as decode
import moegpt.kernels as kernels
from moegpt.config import MLPKind, preset
from moegpt.infer.decode import decode_step, decode_weights, kernel_layers_apply
from moegpt.infer.decode_batch import DecodeMeta
from moegpt.model import build_model

SHAPES = {
    "mqa": {},
    "gqa": dict(n_kv_heads=2),
    "mha-top1": dict(n_kv_heads=4, top_k=1),
    "dense-layers": dict(moe_every=2),
    "gelu": dict(mlp=MLPKind.GELU),
    # the kernel's vector paths: 20 query heads on one kv head (two 16-head blocks), head dim 64
    # (rope and the weighted values on 16 lanes); 3 heads per kv head of dim 96 (a 32-dim tail)
    "mqa-20-heads-dim-64": dict(n_heads=20, head_dim=64),
    "gqa-dim-96": dict(n_heads=6, n_kv_heads=2, head_dim=96),
}


def _model(dtype, **kw):
    cfg = preset("tiny").replace(**{**dict(vocab_size=100, n_layers=2, d_model=64, n_heads=4, d_ff=48, n_experts=16,
                                           max_seq_len=256), **kw})
    return build_model(cfg, seed=1, dtype=dtype).eval()


def _step(model, lens, block_size, seed=0):
    """Random caches holding each sequence's keys before its position, in shuffled blocks -> the
    step's inputs: (weights, tokens, positions, k caches, v caches, meta)."""
    cfg, dtype = model.cfg, model.embed.weight.dtype
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-max(lens) // block_size)
    n_blocks = per_seq * len(lens) + 1
    order = torch.randperm(n_blocks - 1, generator=g) + 1  # block 0 is never a sequence's
    tables = order.view(len(lens), per_seq)
    shape = (n_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
    k = [torch.randn(shape, generator=g).to(dtype) for _ in range(cfg.n_layers)]
    v = [torch.randn(shape, generator=g).to(dtype) for _ in range(cfg.n_layers)]
    tokens = torch.randint(0, cfg.vocab_size, (len(lens),), generator=g)
    positions = torch.tensor([n - 1 for n in lens])
    meta = DecodeMeta(block_tables=tables.contiguous(), block_size=block_size, lens=tuple(lens))
    return decode_weights(model), tokens, positions, k, v, meta


def _both(model, lens, block_size, monkeypatch):
    w, tokens, positions, k, v, meta = _step(model, lens, block_size)
    assert kernel_layers_apply(w, w.embed(tokens), k)
    k2, v2 = [t.clone() for t in k], [t.clone() for t in v]
    fused = decode_step(w, tokens, positions, k, v, meta)
    with monkeypatch.context() as m:
        m.setattr(decode, "kernel_layers_apply", lambda *a: False)
        m.setattr(decode, "gemv_applies", lambda *a: False)
        oracle = decode_step(w, tokens, positions, k2, v2, meta)
    return fused, oracle, (k, v), (k2, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch,block_size", [(1, 16), (3, 1), (8, 4), (32, 16), (64, 8)])
def test_the_fused_layer_is_the_pytorch_program(shape, dtype, batch, block_size, monkeypatch):
    assert kernels.available()
    model = _model(dtype, **SHAPES[shape])
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 200, (batch,), generator=g).tolist()
    lens[0] = 150  # past two of the op's 64-key chunks
    (logits, counts), (want, want_counts), (k, v), (k2, v2) = _both(model, lens, block_size, monkeypatch)
    if dtype == torch.float32:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    else:  # bf16 roundings in another order: nearly all logits within bf16's step, none far off
        off = (logits.float() - want.float()).abs() > 0.05 * (1 + want.float().abs())
        assert off.float().mean() < 0.005 and (logits.float() - want.float()).abs().max() < 0.5
    for a, b in zip(k + v, k2 + v2):  # the new keys and values written to the same slots
        t = 1e-5 if dtype == torch.float32 else 0.02
        torch.testing.assert_close(a.float(), b.float(), rtol=t, atol=t)
    if want_counts is None:
        assert counts is None
    else:
        assert counts.shape == want_counts.shape and (counts.sum(1) == batch * model.cfg.top_k).all()
        if dtype == torch.float32:  # the same experts chosen (bf16 rounding may break a near tie)
            assert torch.equal(counts, want_counts)


@pytest.mark.parametrize("dtype,batch", [(torch.float32, 4), (torch.bfloat16, 4), (torch.float32, 40)])
def test_a_sequence_gets_bitwise_the_same_layer_alone_or_beside_others(dtype, batch):
    """Up to the kernel's row limit (fp32: 64, bf16: 16) every product sums each row in one order
    whatever the rows beside it, and attention is per sequence in fixed chunks: a sequence's result
    does not depend on its neighbours."""
    model = _model(dtype)
    lens = ([150, 7, 90, 33] * 10)[:batch]
    w, tokens, positions, k, v, meta = _step(model, lens, 4)
    together, _ = decode_step(w, tokens, positions, [t.clone() for t in k], [t.clone() for t in v], meta)
    for b in range(len(lens)):
        one = DecodeMeta(block_tables=meta.block_tables[b:b + 1].contiguous(), block_size=4, lens=(lens[b],))
        alone, _ = decode_step(w, tokens[b:b + 1], positions[b:b + 1], [t.clone() for t in k],
                               [t.clone() for t in v], one)
        assert torch.equal(alone[0], together[b]), b


def test_bad_metadata_is_an_error_naming_the_value():
    model = _model(torch.float32)
    w, tokens, positions, k, v, meta = _step(model, [10], 4)
    lw = w.layers[0]
    args = lambda pos, tables: (w.embed(tokens), lw.attn_norm, lw.wqkv.w, lw.wo.w, lw.ffn_norm, lw.router.w, lw.w_in,
                                lw.w_down, k[0], v[0], w.rope_cos, w.rope_sin, pos, tables, 4, 4, 2, True, 1e-5,
                                None, 0, 6, 8)
    with pytest.raises(RuntimeError, match="position 300 of sequence 0"):
        torch.ops.moegpt.decode_layer(*args(torch.tensor([300]), meta.block_tables))
    with pytest.raises(RuntimeError, match="block 99 of sequence 0"):
        torch.ops.moegpt.decode_layer(*args(positions, torch.full_like(meta.block_tables, 99)))
    with pytest.raises(RuntimeError, match="is outside the cache"):  # no overflow past the bounds check
        torch.ops.moegpt.decode_layer(*args(positions, torch.full_like(meta.block_tables, 2**62 - 1)))
    for bs in (0, -4):
        a = list(args(positions, meta.block_tables))
        a[14] = bs
        with pytest.raises(RuntimeError, match=f"block_size {bs} must be >= 1"):
            torch.ops.moegpt.decode_layer(*a)
    a = list(args(positions, meta.block_tables))
    a[0] = a[0][:0]
    with pytest.raises(RuntimeError, match="an empty batch"):
        torch.ops.moegpt.decode_layer(*a)
    a = list(args(positions, meta.block_tables))
    a[1] = a[1][:-1]  # a norm of the wrong size
    with pytest.raises(RuntimeError, match="weight shapes do not match"):
        torch.ops.moegpt.decode_layer(*a)


class _OneRank:
    """The collectives of a sharded model of one rank: sums of one partial output are the output."""

    splits_experts = False

    def sum_partials(self, x):
        return x

    def experts(self, rows, expert, ends, ffn):
        return ffn(rows, expert, ends)


@pytest.mark.parametrize("shape", ["mqa", "dense-layers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_in_two_parts_is_the_whole_layer_bitwise(dtype, shape):
    """What a tensor-parallel rank runs (attention's output, then the FFN's, each summed over ranks
    between them) equals the whole layer when the sums are over one rank."""
    model = _model(dtype, **SHAPES[shape])
    w, tokens, positions, k, v, meta = _step(model, [5, 40, 17], block_size=4)
    x = w.embed(tokens)
    k2, v2 = [t.clone() for t in k], [t.clone() for t in v]
    whole, counts = decode.decode_layers(w, x, positions, k, v, meta)
    parts, part_counts = decode.decode_layers(w, x, positions, k2, v2, meta, comm=_OneRank())
    assert torch.equal(whole, parts)
    assert torch.equal(counts, part_counts)
    assert all(torch.equal(a, b) for a, b in zip(k + v, k2 + v2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ffn_part_over_split_experts_sums_to_all_experts_bitwise(dtype):
    """An expert-parallel rank's FFN part (its experts [first, first + El) of the router's E, the
    others adding zero): the ranks' parts summed in rank order are the FFN part with every expert."""
    import dataclasses

    model = _model(dtype)
    w, tokens, positions, k, v, meta = _step(model, [5, 40, 17, 3], block_size=4)
    x, lw = w.embed(tokens), w.layers[0]
    E = lw.w_in.shape[0]
    whole = decode.layer_with_kernel(x, w, lw, k[0], v[0], positions, meta, None, 0, decode.FFN_PART)
    parts = []
    for first in (0, E // 2):
        local = dataclasses.replace(lw, w_in=lw.w_in[first:first + E // 2], w_down=lw.w_down[first:first + E // 2])
        parts.append(decode.layer_with_kernel(x, w, local, k[0], v[0], positions, meta, None, 0, decode.FFN_PART, first))
    assert torch.equal((parts[0].float() + parts[1].float()).to(dtype), whole)
    assert not torch.equal(parts[0], whole)  # each part alone is not the whole
