"""A quantized embedding table (``quantize_model(..., embedding=True)``, ``moegpt quantize
--quantize-embedding``): a lookup dequantizes only the rows it reads and gives the rows of the table
dequantized whole; the model and the decode program compute with it as with the dequantized table;
and the stored bytes meet the issue's targets at the `small` shape."""

import pytest
import torch

from moegpt.config import preset
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.infer.runner import Chunk, ModelRunner
from moegpt.model import MoEGPT, build_model
from moegpt.quant.model import EMBEDDING, is_quantized, quantize_model, stored, targets, weight_bytes
from moegpt.quant.scheme import QuantScheme, dequantize, parse_scheme, quantize

SCHEMES = [QuantScheme(bits=8), QuantScheme(bits=4, group_size=32)]
CFG = preset("tiny").replace(vocab_size=256, n_layers=2, n_experts=4)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_lookup_gives_the_rows_of_the_whole_table_dequantized(scheme):
    model = build_model(CFG, seed=1).eval()
    table = model.embed.weight.detach().clone()
    quantize_model(model, scheme, embedding=True)
    assert is_quantized(model.embed, "weight") and targets(model)[0].name == EMBEDDING
    packed, dq = stored(model.embed, "weight")
    assert packed.dtype == torch.uint8 and packed.shape == (256, 128 * scheme.bits // 8)
    whole = dequantize(*quantize(table, scheme), scheme.bits)  # (V, D): the oracle
    ids = torch.tensor([[3, 255, 0], [3, 17, 200]])
    with torch.no_grad():
        assert torch.equal(model.embed(ids), whole[ids])


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_the_model_and_the_decode_program_compute_with_the_dequantized_table(scheme):
    model = quantize_model(build_model(CFG, seed=2).eval(), scheme, embedding=True)
    reference = quantize_model(build_model(CFG, seed=2).eval(), scheme)  # the table in full precision ...
    with torch.no_grad():
        reference.embed.weight.copy_(dequantize(*quantize(reference.embed.weight, scheme), scheme.bits))  # ... dequantized
        x = torch.randint(0, 256, (2, 9))
        assert torch.equal(model(x).logits, reference(x).logits)
    # generation's path: prefill through the forward, then one-token steps through the decode program
    # (its int8 activations too), against the same path with the dequantized table in full precision
    logits = []
    for m in (model, reference):
        runner = ModelRunner(m, PagedKVCache(m.cfg, 8, 4, torch.float32))
        prompt = x[0].tolist()
        runner.run([Chunk(tokens=tuple(prompt), start=0, block_table=tuple(range(8)), num_logits=1)])
        logits.append(runner.run([Chunk(tokens=(7,), start=len(prompt), block_table=tuple(range(8)),
                                        num_logits=1)]).logits)
    assert torch.equal(*logits)


def test_an_fp8_or_tied_table_is_refused_in_one_line():
    with pytest.raises(ValueError, match="fp8 is for matmuls"):
        quantize_model(build_model(CFG), parse_scheme("fp8"), embedding=True)
    with pytest.raises(ValueError, match="ties its LM head to the embedding table"):
        quantize_model(build_model(CFG.replace(tie_embeddings=True)), parse_scheme("int8"), embedding=True)


@pytest.mark.parametrize("scheme,embedding,most", [
    ("int8", False, 0.29), ("int8", True, 0.28), ("int4", False, 0.20), ("int4", True, 0.16)])
def test_stored_weight_bytes_at_the_small_shape(scheme, embedding, most):
    """The issue's targets (<= 0.28x fp32 for int8, <= 0.16x for int4 g32) hold with the table
    quantized; without it the fp32 table alone keeps them out of reach. (Meta tensors: the bytes
    depend on the shapes only.)"""
    with torch.device("meta"):
        model = MoEGPT(preset("small"))
    fp32 = weight_bytes(model)
    quantize_model(model, parse_scheme(scheme), embedding=embedding)
    ratio = weight_bytes(model) / fp32
    assert ratio <= most and (embedding or ratio > {"int8": 0.28, "int4": 0.16}[scheme])
