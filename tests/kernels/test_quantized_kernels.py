"""The quantized C++ products (torch.ops.moegpt.qgemv, and decode_layer with quantized weights)
against their oracle: the same product with the weights dequantized in fp32 (moegpt/quant)."""

import pytest
import torch

import moegpt.infer.decode as decode
import moegpt.kernels as kernels
from moegpt.config import preset
from moegpt.infer.decode import decode_step, decode_weights, kernel_layers_apply
from moegpt.model import build_model
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import QuantScheme, dequantize, quantize, quantized_matmul, rows, tile, tile_scales

SCHEMES = [QuantScheme(bits=8), QuantScheme(bits=8, group_size=32), QuantScheme(bits=4, group_size=32),
           QuantScheme(bits=4, group_size=128)]


# rows with I a multiple of 128 (int8 activations) or not (per channel only: fp32 activations, a
# tail past the last 64 inputs), and tiles of 16 rows
CASES = [(s, layout, O, I) for s in SCHEMES for layout, O, I in [("rows", 301, 256), ("rows", 301, 200), ("tiles", 320, 256)]
         if I % (s.group_size or 1) == 0]


@pytest.mark.parametrize("scheme,layout,O,I", CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qgemv_is_the_quantized_matmul(scheme, rows, dtype, layout, O, I):
    assert kernels.available()
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(O, I, generator=g)
    packed, scale = quantize(w, scheme)
    if layout == "tiles":
        packed, scale = tile(packed, scheme.bits), tile_scales(scale)
    x = torch.randn(rows, I, generator=g).to(dtype)
    got = torch.ops.moegpt.qgemv(x, packed, scale, scheme.bits)
    want = quantized_matmul(x, packed, scale, scheme.bits).to(dtype)
    assert got.dtype == dtype and got.shape == (rows, O)
    if dtype == torch.float32:  # within 1e-5 of the largest output (the stored offsets' sums cancel in fp32)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    for m in range(rows):  # batch invariant: a row alone gets bitwise what it got beside the others
        assert torch.equal(torch.ops.moegpt.qgemv(x[m:m + 1], packed, scale, scheme.bits)[0], got[m])


def test_bad_quantized_inputs_are_errors_naming_the_shapes():
    packed, scale = quantize(torch.randn(8, 64), QuantScheme(bits=4, group_size=32))
    with pytest.raises(RuntimeError, match=r"scale \[8, 3\] does not match weight \[8, 32\]"):
        torch.ops.moegpt.qgemv(torch.randn(1, 64), packed, torch.ones(8, 3), 4)
    with pytest.raises(RuntimeError, match="x \\(M, I\\) on the CPU for w of 64 inputs"):
        torch.ops.moegpt.qgemv(torch.randn(1, 65), packed, scale, 4)
    with pytest.raises(RuntimeError, match="bits 5"):
        torch.ops.moegpt.qgemv(torch.randn(1, 64), packed, scale, 5)


def _quantized_model(dtype, scheme):
    cfg = preset("tiny").replace(vocab_size=100, n_layers=2, d_model=128, n_heads=4, d_ff=128, n_experts=16,
                                 max_seq_len=256)
    return quantize_model(build_model(cfg, seed=1, dtype=dtype).eval(), scheme)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_the_fused_layer_with_quantized_weights_is_the_pytorch_program(scheme, dtype, batch, monkeypatch):
    from tests.kernels.test_decode_layer import _step

    model = _quantized_model(dtype, scheme)
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 200, (batch,), generator=g).tolist()
    w, tokens, positions, k, v, meta = _step(model, lens, 8)
    assert w.layers[0].bits == scheme.bits and w.head.scale is not None
    assert kernel_layers_apply(w, w.embed(tokens), k)
    k2, v2 = [t.clone() for t in k], [t.clone() for t in v]
    logits, counts = decode_step(w, tokens, positions, k, v, meta)
    with monkeypatch.context() as m:
        m.setattr(decode, "kernel_layers_apply", lambda *a: False)
        m.setattr(decode, "qgemv_applies", lambda *a: False)
        want, want_counts = decode_step(w, tokens, positions, k2, v2, meta)
    # The products take int8 activations (every input count here is a multiple of 64): an fp32
    # rounding apart in a layer's input can move an activation one int8 step, so the layers agree to
    # that step, not to fp32's (qgemv's own test above holds the product itself to 1e-5).
    err = (logits.float() - want.float()).abs()
    if dtype == torch.float32:
        assert err.max() < 0.05 and err.mean() < 2e-3, (err.max(), err.mean())
        assert (counts - want_counts).abs().sum() <= 2 * batch // 5  # a near tie in routing may flip
    else:  # and bf16 roundings in another order: nearly all logits within bf16's step, none far off
        off = err > 0.05 * (1 + want.float().abs())
        assert off.float().mean() < 0.02 and err.max() < 0.5


def test_the_decode_program_reads_the_packed_bytes_not_a_dequantized_copy():
    model = _quantized_model(torch.float32, QuantScheme(bits=4, group_size=32))
    w = decode_weights(model)
    experts = model.layers[0].ffn.experts
    packed = experts.parametrizations.w_gate.original
    assert w.layers[0].w_in.dtype == torch.uint8
    assert w.layers[0].w_in.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()  # fused in place
    assert w.layers[0].w_in_scale.untyped_storage().data_ptr() == \
        experts.parametrizations.w_gate[0].scale.untyped_storage().data_ptr()


@pytest.mark.parametrize("scheme", [QuantScheme(bits=8), QuantScheme(bits=4, group_size=32),
                                    QuantScheme(bits=4, group_size=128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_tiles_is_bitwise_the_reference(scheme, dtype):
    """What a plain model's forward multiplies by (prefill): the C++ pass over the tiles equals
    untile + unpack + scale in PyTorch ops, bit for bit, for a stack of experts and one matrix."""
    assert kernels.available()
    for shape in ((3, 48, 256), (32, 384)):
        packed, scale = quantize(torch.randn(shape) * torch.rand(shape[-2], 1), scheme)
        t, s = tile(packed, scheme.bits), tile_scales(scale)
        want = dequantize(*rows(t, s, scheme.bits), scheme.bits, dtype)
        assert torch.equal(torch.ops.moegpt.dequantize_tiles(t, s, scheme.bits, dtype), want)


def test_a_quantized_model_in_tiles_forwards_as_in_rows():
    """The parametrization takes the tile kernel once the decode program has laid the weights out in
    tiles: the model's forward (prefill) gives the same logits as before the layout."""
    model = quantize_model(build_model(preset("tiny"), seed=0), QuantScheme(bits=4, group_size=32)).eval()
    tokens = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        before = model(tokens).logits
        decode_weights(model)  # tiles the quantized weights in place
        assert model.layers[0].ffn.experts.parametrizations.w_gate[0].scale.dim() == 4  # (E, T, G, 16): tiled
        assert torch.equal(model(tokens).logits, before)
