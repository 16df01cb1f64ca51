"""Pre-training the image side on its own (train/vision_pretrain.py): only the tower and resampler
change, bit-reproducibly, they learn the scenes' fields, and the fresh tower's patch positions are
the sine-cosine table."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import preset
from moegpt.data.images import ImageProcessing
from moegpt.data.vision_data import parse_vision_mixture
from moegpt.model import build_model
from moegpt.model.vision.tower import VisionTower, sincos_positions
from moegpt.model.vision.vision_model import add_vision
from moegpt.train.vision_pretrain import pretrain_image_side
from moegpt.vision_config import VisionConfig, tower_preset

TOWER = tower_preset("tiny")


def _model():
    torch.manual_seed(0)
    cfg = preset("tiny").replace(d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4)
    return add_vision(build_model(cfg, seed=0), VisionConfig.for_text(cfg, TOWER, n_latents=16), seed=0)


def _pretrain(model, steps, data="shapes:1", **kw):
    return pretrain_image_side(model, parse_vision_mixture(data), ImageProcessing.for_tower(TOWER), steps=steps,
                               batch_size=16, seed=0, eval_n=100, **kw)


def test_only_the_tower_and_resampler_change_and_the_same_run_gives_the_same_weights():
    a, b = _model(), _model()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    _pretrain(a, 3, lr=1e-3)
    _pretrain(b, 3, lr=1e-3)
    after = a.state_dict()
    assert all(torch.equal(after[k], v) for k, v in b.state_dict().items())
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"tower", "resampler"}


def test_the_image_side_learns_the_scenes():
    report = _pretrain(_model(), 80, lr=1e-3)
    assert report.accuracy["colour"] > 0.4  # chance: 1/6; 54% measured
    assert report.steps == 80


def test_screenshots_and_scenes_share_a_step():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _pretrain(model, 2, data="screenshots:1,shapes:1", lr=1e-3)
    assert set(report.accuracy) == {"count", "colour", "shape", "position", "screenshots_characters_f1"}
    after = model.state_dict()
    assert not torch.equal(before["tower.patch_embed.weight"], after["tower.patch_embed.weight"])
    with pytest.raises(ValueError, match="at least one picture of each a step"):
        pretrain_image_side(model, parse_vision_mixture("screenshots:1,shapes:1"), ImageProcessing.for_tower(TOWER),
                            steps=1, batch_size=1, lr=1e-3, seed=0)


def test_a_fresh_tower_places_its_patches_with_the_sine_cosine_table():
    tower = VisionTower(TOWER)
    tower.init_weights(torch.Generator().manual_seed(0))
    table = sincos_positions(TOWER.grid, TOWER.hidden_size)
    scale = 0.02 * (TOWER.num_channels * TOWER.patch_size ** 2) ** 0.5
    torch.testing.assert_close(tower.pos_embed.weight[1:], table * scale, rtol=0, atol=0)
    assert table.shape == (TOWER.grid ** 2, TOWER.hidden_size)
    assert torch.equal(table[0],  # row-major: patch 0 sits at x = y = 0
                       torch.tensor([0.0, 1.0, 0.0, 1.0]).repeat_interleave(TOWER.hidden_size // 4))
