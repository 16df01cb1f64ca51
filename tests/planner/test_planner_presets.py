"""Planner presets: counts.py gives the sizes the article's reasoning needs."""

import pytest

from moegpt.counts import param_counts
from moegpt.planner.presets import PLANNER_PRESETS, planner_preset, with_total_params


@pytest.mark.parametrize("name", ["gpt4", "gpt4-mha", "gpt4-gqa"])
def test_gpt4_variants_match_the_article_split(name):
    c = param_counts(planner_preset(name))
    assert c.total == pytest.approx(1.83e12, rel=0.01)
    assert c.per_expert == pytest.approx(111e9, rel=0.01)
    assert c.attention == pytest.approx(55e9, rel=0.05)
    assert c.active_per_token == pytest.approx(280e9, rel=0.02)


@pytest.mark.parametrize("name", sorted(PLANNER_PRESETS))
def test_counts_equal_the_parameters_of_the_model_built_on_meta(name):
    """counts.py, the planner's only parameter formula, against the real modules (no memory used)."""
    from moegpt.model import build_model

    cfg = planner_preset(name)
    c = param_counts(cfg)
    named = dict(build_model(cfg, device="meta").named_parameters())
    assert sum(p.numel() for p in named.values()) == c.total
    assert sum(p.numel() for n, p in named.items() if ".experts." in n) == c.experts_total
    assert sum(p.numel() for n, p in named.items() if ".router." in n) == c.router


def test_dense_presets_count_as_dense_models():
    """No router, no experts: the total is the hand count of a dense transformer without biases."""
    for name, expected in (("dense-1t", 1.01e12), ("davinci", 174.6e9), ("palm540b-mha", 592.7e9)):
        cfg = planner_preset(name)
        c = param_counts(cfg)
        L, D = cfg.n_layers, cfg.d_model
        mlp = (3 if cfg.mlp.value == "swiglu" else 2) * D * cfg.d_ff
        attention = 2 * D * cfg.q_dim + 2 * D * cfg.kv_dim
        embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
        assert c.total == L * (attention + mlp) + embedding + (2 * L + 1) * D
        assert c.active_per_token == c.total and c.router == c.experts_total == 0
        assert c.total == pytest.approx(expected, rel=0.005)


def test_a_dense_preset_stays_dense_at_any_depth():
    deeper = with_total_params(planner_preset("dense-1t"), 2e12)  # past the preset's 128 layers
    assert deeper.n_layers > 128 and deeper.n_moe_layers == 0
    assert param_counts(deeper).router == 0


def test_with_total_params_moves_depth_only():
    base = planner_preset("dense-1t")
    cfg = with_total_params(base, 175e9)
    assert cfg.d_model == base.d_model and cfg.n_layers < base.n_layers
    assert param_counts(cfg).total == pytest.approx(175e9, rel=0.05)


def test_model_presets_are_planner_presets():
    assert {"tiny", "small", "mixtral-8x7b", "gpt4", "davinci"} <= set(PLANNER_PRESETS)
