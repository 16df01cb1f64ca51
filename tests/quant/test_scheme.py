"""Quantize / dequantize: the packed layout is compressed-tensors' pack-quantized one, the error is
what the scale allows, and a quantized plain model computes with its dequantized weights."""

import pytest
import torch

from moegpt.config import preset
from moegpt.model import build_model
from moegpt.quant.model import model_scheme, quantize_model, targets, weight_bytes
from moegpt.quant.scheme import QuantScheme, dequantize, pack, parse_scheme, quantize, unpack

SCHEMES = [QuantScheme(bits=8), QuantScheme(bits=8, group_size=64), QuantScheme(bits=4, group_size=32),
           QuantScheme(bits=4, group_size=128)]


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_bytes_are_compressed_tensors_int32_words_read_as_bytes(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    lo = -(2 ** (bits - 1))
    q = torch.randint(lo, -lo, (5, 3, 64), dtype=torch.int8)  # an expert stack
    ours = pack(q, bits)
    assert torch.equal(pack_to_int32(q, bits).view(torch.uint8), ours)
    assert torch.equal(unpack(ours, bits), q)
    assert torch.equal(unpack_from_int32(ours.view(torch.int32), bits, q.shape), q)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_the_error_is_within_half_a_step_and_the_largest_weight_is_exact(scheme):
    w = torch.randn(3, 48, 256, generator=torch.Generator().manual_seed(0))
    w[0, 0, 5] = 0.0
    w[1, 2] = 0.0  # an all-zero row
    packed, scale = quantize(w, scheme)
    G = 1 if scheme.group_size is None else 256 // scheme.group_size
    assert packed.dtype == torch.uint8 and packed.shape == (3, 48, 256 * scheme.bits // 8)
    assert scale.dtype == torch.float32 and scale.shape == (3, 48, G)
    back = dequantize(packed, scale, scheme.bits)
    step = scale.repeat_interleave(256 // G, dim=-1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()  # (plus fp32 rounding of w / scale and q * scale)
    assert torch.equal(back[1, 2], torch.zeros(256))
    big = w.abs().argmax(-1, keepdim=True)  # per row: the largest |w| comes back to the last bit (in its group)
    if G == 1:
        torch.testing.assert_close(back.gather(-1, big), w.gather(-1, big), rtol=1e-6, atol=0)


def test_scales_are_rounded_to_the_stored_dtype_before_q_is_chosen():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, scale = quantize(w, QuantScheme(bits=8))
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # exactly what a bf16 directory stores
    assert ((dequantize(packed, scale, 8) - w.float()).abs() <= scale / 2 + 1e-6).all()


def test_bad_schemes_are_one_line_errors():
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        QuantScheme(bits=3)
    with pytest.raises(ValueError, match="int4 needs a group size"):
        QuantScheme(bits=4)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        parse_scheme("int4", 48)
    with pytest.raises(ValueError, match="scheme 'fp4' is not supported"):
        parse_scheme("fp4")
    with pytest.raises(ValueError, match="int4-g128: 64 input features are not a multiple of group size 128"):
        quantize(torch.randn(4, 64), QuantScheme(bits=4, group_size=128))


@pytest.mark.parametrize("scheme", [QuantScheme(bits=8), QuantScheme(bits=4, group_size=32)], ids=lambda s: s.name)
def test_a_quantized_model_computes_with_its_dequantized_weights(scheme):
    cfg = preset("tiny").replace(vocab_size=256, n_layers=2)
    model = build_model(cfg, seed=3).eval()
    router = model.layers[0].ffn.router.weight.clone()
    quantize_model(model, scheme)
    assert model_scheme(model) == scheme
    assert {t.name for t in targets(model)} >= {"layers.0.attn.wq.weight", "layers.1.ffn.experts.w_down", "lm_head.weight"}
    assert torch.equal(model.layers[0].ffn.router.weight, router)  # the router stays full precision
    reference = build_model(cfg, seed=3).eval()
    with torch.no_grad():  # the same weights, dequantized by hand, in a plain model: the same logits
        for t in targets(reference):
            w = getattr(t.module, t.attr)
            packed, scale = quantize(w, scheme)
            w.copy_(dequantize(packed, scale, scheme.bits))
        x = torch.randint(0, 256, (2, 12))
        assert torch.equal(model(x).logits, reference(x).logits)
    assert weight_bytes(model) < 0.4 * weight_bytes(reference)


def test_casting_a_quantized_model_keeps_its_scales_and_dequantizes_to_the_new_dtype():
    model = quantize_model(build_model(preset("tiny").replace(vocab_size=256, n_layers=1), seed=3), QuantScheme(bits=8))
    dq = model.layers[0].attn.wq.parametrizations.weight[0]
    scale = dq.scale.clone()
    model.to(torch.bfloat16)
    assert dq.scale.dtype == torch.float32 and torch.equal(dq.scale, scale)
    assert model.layers[0].attn.wq.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 256, (1, 5))).logits.dtype == torch.bfloat16
