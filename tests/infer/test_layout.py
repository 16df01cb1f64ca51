"""The decode weight layout: same parameters, same values, same outputs; weights stored (in, out)."""

import copy

import torch

from moegpt.config import preset
from moegpt.infer.layout import lay_out_for_decoding
from moegpt.model import build_model


def _cfg(**kw):
    return preset("tiny").replace(vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=48, n_experts=4, **kw)


def test_fp32_weights_are_stored_in_by_out_with_the_same_names_values_and_outputs():
    model = build_model(_cfg(), seed=1).eval()
    before = copy.deepcopy(model)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert lay_out_for_decoding(model) is model
    old, new = before.state_dict(), model.state_dict()
    assert list(old) == list(new)
    for name, t in new.items():
        assert t.shape == old[name].shape and torch.equal(t, old[name]), name
        if t.dim() >= 2 and not name.startswith("embed"):  # every matmul weight: a transposed view
            assert t.transpose(-2, -1).is_contiguous() and not t.is_contiguous(), name
    assert model.embed.weight.is_contiguous()  # lookups read rows
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before(tokens).logits, rtol=1e-5, atol=1e-5)
    ptrs = [p.data_ptr() for p in model.parameters()]
    lay_out_for_decoding(model)  # idempotent: nothing is copied again
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_bf16_and_a_tied_head_keep_their_layout():
    bf16 = build_model(_cfg(), seed=1, dtype=torch.bfloat16)
    lay_out_for_decoding(bf16)
    assert all(p.is_contiguous() for p in bf16.parameters())  # 20x slower transposed without bf16 units
    tied = lay_out_for_decoding(build_model(_cfg(tie_embeddings=True), seed=1))
    assert tied.embed.weight.is_contiguous()
