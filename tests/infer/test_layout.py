"""The decode weight layout: same parameters, same values, same outputs; q|k|v and gate|up fused,
fp32 weights stored (in, out) where the decode program runs on PyTorch's kernels, (out, in) where
moegpt's C++ kernels run it."""

import copy

import pytest
import torch
from torch import nn

import moegpt.kernels as kernels

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import preset
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.speculative import SpeculativeConfig
from moegpt.infer.layout import lay_out_for_decoding, restore_layout
from moegpt.model import build_model


def _cfg(**kw):
    return preset("tiny").replace(**{**dict(vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=48, n_experts=4),
                                     **kw})


def _laid_out(t: torch.Tensor) -> bool:
    """Stored (in, out): consecutive elements run along the out dim."""
    return t.stride(-2) == 1 and t.stride(-1) != 1


def _rows_kept(t: torch.Tensor) -> bool:
    """Stored (out, in), as nn.Linear stores it (a fused slice need not be contiguous as a whole)."""
    return t.stride(-1) == 1


@pytest.fixture
def without_kernels(monkeypatch):
    """As on a machine with no C++ compiler: the decode program on PyTorch's kernels."""
    monkeypatch.setattr(kernels, "available", lambda: False)


def test_fp32_weights_are_stored_in_by_out_with_the_same_names_values_and_outputs(without_kernels):
    model = build_model(_cfg(), seed=1).eval()
    before = copy.deepcopy(model)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert lay_out_for_decoding(model) is model
    old, new = before.state_dict(), model.state_dict()
    assert list(old) == list(new)
    for name, t in new.items():
        assert t.shape == old[name].shape and torch.equal(t, old[name]), name
        if t.dim() >= 2 and not name.startswith("embed"):  # every matmul weight: a transposed view
            assert _laid_out(t), name
    assert model.embed.weight.is_contiguous()  # lookups read rows
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before(tokens).logits, rtol=1e-5, atol=1e-5)
    ptrs = [p.data_ptr() for p in model.parameters()]
    lay_out_for_decoding(model)  # idempotent: nothing is copied again
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert restore_layout(model) is model and all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(t, old[name]) for name, t in model.state_dict().items())


def test_with_the_kernels_fp32_weights_keep_nn_linears_layout():
    assert kernels.available()
    model = lay_out_for_decoding(build_model(_cfg(), seed=1).eval())
    assert all(_rows_kept(p) for p in model.parameters())


def test_bf16_and_an_embedding_table_shared_by_a_linear_keep_their_layout(without_kernels):
    bf16 = build_model(_cfg(), seed=1, dtype=torch.bfloat16)
    lay_out_for_decoding(bf16)
    assert all(_rows_kept(p) for p in bf16.parameters())  # 20x slower transposed without bf16 units
    shared = nn.Module()
    shared.table, shared.head, shared.proj = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False), nn.Linear(8, 8)
    shared.head.weight = shared.table.weight  # a tied head: the table's rows are looked up
    lay_out_for_decoding(shared)
    assert shared.table.weight.is_contiguous() and _laid_out(shared.proj.weight)


def test_the_engine_lays_out_its_models_and_they_still_save_and_load(tmp_path, without_kernels):
    model, draft = build_model(_cfg(), seed=1).eval(), build_model(_cfg(n_layers=1), seed=2).eval()
    reference = copy.deepcopy(model).state_dict()
    engine = LLMEngine(model, EngineConfig(speculative=SpeculativeConfig(num_tokens=2)), draft=draft)
    assert engine.model is model and _laid_out(model.lm_head.weight) and _laid_out(model.layers[0].ffn.experts.w_up)
    assert _laid_out(engine.draft.lm_head.weight)
    save(model, None, tmp_path)
    loaded, _ = load(tmp_path)
    assert all(torch.equal(t, reference[name]) for name, t in loaded.state_dict().items())


def test_q_k_v_and_gate_up_become_slices_of_one_buffer_each():
    from moegpt.infer.layout import fused_groups, fused_view, is_fused

    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(_cfg(), seed=1, dtype=dtype).eval()
        before = copy.deepcopy(model)
        lay_out_for_decoding(model)
        groups = fused_groups(model)
        assert len(groups) == 2 * model.cfg.n_layers  # one attention and one SwiGLU expert stack per layer
        for params, dim in groups:
            assert is_fused(params, dim)
            whole = fused_view(params, dim)
            assert torch.equal(whole, torch.cat([p.detach() for p in params], dim=dim))
        attn = model.layers[0].attn
        assert attn.wk.weight.untyped_storage().data_ptr() == attn.wq.weight.untyped_storage().data_ptr()
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
