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


def test_dense_presets_count_as_dense_models():
    """One expert, top-1: active == total; the only extra over a hand count is counts.py's L*D router."""
    for name, expected in (("dense-1t", 1.01e12), ("davinci", 174.6e9), ("palm540b-mha", 592.7e9)):
        cfg = planner_preset(name)
        c = param_counts(cfg)
        L, D = cfg.n_layers, cfg.d_model
        mlp = (3 if cfg.mlp.value == "swiglu" else 2) * D * cfg.d_ff
        attention = 2 * D * cfg.q_dim + 2 * D * cfg.kv_dim
        embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
        by_hand = L * (attention + mlp) + embedding + (2 * L + 1) * D
        assert c.active_per_token == c.total
        assert c.total - by_hand == L * D  # the 1-wide router counts.py adds
        assert c.total == pytest.approx(expected, rel=0.005)


def test_with_total_params_moves_depth_only():
    base = planner_preset("dense-1t")
    cfg = with_total_params(base, 175e9)
    assert cfg.d_model == base.d_model and cfg.n_layers < base.n_layers
    assert param_counts(cfg).total == pytest.approx(175e9, rel=0.05)


def test_model_presets_are_planner_presets():
    assert {"tiny", "small", "mixtral-8x7b", "gpt4", "davinci"} <= set(PLANNER_PRESETS)
