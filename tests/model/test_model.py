"""Model shape, counting formulas against real modules, caching and bad configs."""

import pytest
import torch

from moegpt.config import MLPKind, PRESETS, ModelConfig, preset
from moegpt.counts import forward_flops_per_token, kv_cache_bytes_per_token, param_counts
from moegpt.infer.kv_cache import KVCache
from moegpt.model import build_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_equal_numel_of_meta_model(name):
    cfg = PRESETS[name]
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts == param_counts(cfg).experts_total
    attention = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n)
    assert attention == param_counts(cfg).attention


def test_dense_layers_and_tied_embeddings_are_counted():
    cfg = PRESETS["tiny"].replace(moe_every=2, tie_embeddings=True, mlp=MLPKind.GELU)
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total
    assert param_counts(cfg).dense_mlp > 0


def test_gpt4_preset_matches_the_article_shape():
    c = param_counts(preset("gpt4"))
    assert 1.80e12 < c.total < 1.86e12  # article: ~1.8T
    assert 2.75e11 < c.active_per_token < 2.85e11  # article: ~280B active
    assert 1.10e11 < c.per_expert < 1.12e11  # article: ~111B per expert
    assert 5.0e10 < c.attention < 6.0e10  # article: ~55B attention
    # ~560 GFLOP per token forward (2 x active)
    assert 5.4e11 < forward_flops_per_token(preset("gpt4")) < 5.7e11


def test_small_preset_is_half_a_billion_total_and_point_one_two_active():
    c = param_counts(preset("small"))
    assert round(c.total / 1e9, 2) == 0.52
    assert round(c.active_per_token / 1e9, 2) == 0.12


def test_mqa_shrinks_kv_cache_by_the_head_count():
    mqa = preset("gpt4")
    mha = mqa.replace(n_kv_heads=mqa.n_heads)
    assert kv_cache_bytes_per_token(mha) == mqa.n_heads * kv_cache_bytes_per_token(mqa)


def test_forward_shapes_and_losses():
    cfg = preset("tiny")
    model = build_model(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 9)))
    assert out.logits.shape == (2, 9, cfg.vocab_size)
    assert out.expert_counts.shape == (cfg.n_layers, cfg.n_experts)
    assert out.aux_loss.item() > 0.5 and out.z_loss.item() > 0


def test_model_is_causal():
    model = build_model(preset("tiny").replace(n_layers=2))
    x = torch.randint(0, 4096, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 4096
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[:, :8], model(y).logits[:, :8])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cached_decoding_equals_full_forward(n_kv_heads):
    cfg = preset("tiny").replace(n_layers=2, n_kv_heads=n_kv_heads)
    model = build_model(cfg, seed=1)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(cfg, batch=2, max_len=10)
        parts = [model(x[:, :6], torch.arange(6), cache).logits]  # prefill
        parts.append(model(x[:, 6:8], torch.arange(6, 8), cache).logits)  # a 2-token chunk
        for t in range(8, 10):
            parts.append(model(x[:, t:t + 1], torch.tensor([t]), cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\) is not divisible by n_kv_heads \(3\)"),
    (dict(top_k=17), r"top_k \(17\) > n_experts \(16\)"),
    (dict(d_model=130), r"d_model \(130\) is not divisible by n_heads \(4\)"),
    (dict(vocab_size=0), r"vocab_size=0"),
    (dict(mlp="relu"), r"mlp='relu'"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0"),
])
def test_bad_configs_fail_with_the_values(overrides, message):
    fields = PRESETS["tiny"].to_dict() | {"head_dim": None} | overrides
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(fields)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
        preset("huge")


def test_config_round_trips_through_dict():
    cfg = preset("gpt4")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_replace_rederives_head_dim_from_new_d_model_and_heads():
    cfg = preset("tiny").replace(d_model=64, n_heads=4)
    assert cfg.head_dim == 16 and cfg.q_dim == 64
    assert preset("tiny").replace(n_heads=8).head_dim == 16
    assert preset("mixtral-8x7b").replace(n_layers=2).head_dim == 128


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_theta="abc"), "rope_theta='abc'"),
    (dict(mlp=3), "mlp=3"),
    (dict(tie_embeddings="yes"), "tie_embeddings='yes'"),
    (dict(n_heads="4"), "n_heads='4'"),
    (dict(capacity_factor="x"), "capacity_factor='x'"),
])
def test_wrongly_typed_fields_are_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").replace(**overrides)


def test_rms_norm_is_the_written_out_formula():
    from moegpt.model.layers import RMSNorm

    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=torch.Generator().manual_seed(0)))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
        h = x.float()
        expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        torch.testing.assert_close(norm(x), expected)
