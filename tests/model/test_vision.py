"""The Flamingo-style vision model: a fresh join computes the text model exactly, each token sees only
the most recent image before it, counts.py counts what is added, and bad shapes fail early."""

import pytest
import torch

from moegpt.config import PRESETS
from moegpt.counts import vision_param_counts
from moegpt.model import build_model
from moegpt.model.vision.cross_attention import GatedCrossAttentionBlock, ImageContext
from moegpt.model.vision.tower import VisionTower
from moegpt.model.vision.vision_model import add_vision
from moegpt.vision_config import TOWER_PRESETS, TowerConfig, VisionConfig

TEXT = PRESETS["tiny"].replace(vocab_size=211, n_layers=3, d_model=64, n_heads=4, d_ff=96, n_experts=4)
SMALL = dict(n_latents=8, resampler_heads=2, resampler_head_dim=16, cross_attention_heads=2,
             cross_attention_head_dim=16)


def _model(every: int = 1, text=TEXT):
    return add_vision(build_model(text, seed=1), VisionConfig.for_text(text, TOWER_PRESETS["tiny"],
                                                                        cross_attention_every=every, **SMALL), seed=2)


def _open_gates(model) -> None:
    with torch.no_grad():
        for block in model.cross_attn.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 211, (2, 16), generator=g)
    locations = torch.zeros(2, 16, dtype=torch.bool)
    locations[0, 3] = locations[0, 10] = locations[1, 6] = True  # row 0: two images; row 1: one
    return tokens, locations, torch.randn(3, 3, 64, 64, generator=g)


@pytest.mark.parametrize("every", [1, 2])
def test_fresh_vision_model_logits_are_bit_identical_to_the_text_model(every):
    model = _model(every).eval()
    tokens, locations, pixels = _batch()
    with torch.no_grad():
        text = model.text(tokens).logits
        assert torch.equal(model(tokens).logits, text)
        assert torch.equal(model(tokens, images=model.images(pixels, locations)).logits, text)


def test_gated_blocks_sit_before_every_nth_layer():
    assert sorted(int(k) for k in _model(2).cross_attn) == [0, 2]
    assert sorted(int(k) for k in _model(1).cross_attn) == [0, 1, 2]


def test_each_token_cross_attends_only_to_the_most_recent_image_before_it():
    cfg = VisionConfig.for_text(TEXT, TOWER_PRESETS["tiny"], **SMALL)
    block = GatedCrossAttentionBlock(TEXT.d_model, cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 16, TEXT.d_model)
    _, locations, _ = _batch()
    latents = torch.randn(3, 8, cfg.tower.hidden_size)
    base = block(x, ImageContext.from_locations(latents, locations))
    for image, sees in [(0, range(3, 10)), (1, range(10, 16)), (2, range(6, 16))]:
        changed = latents.clone()
        changed[image] += 1.0
        out = block(x, ImageContext.from_locations(changed, locations))
        row = 0 if image < 2 else 1
        differs = (out - base).abs().amax(-1) > 0  # (B, T)
        expected = torch.zeros_like(differs)
        expected[row, list(sees)] = True
        assert torch.equal(differs, expected), f"image {image}"
    before = torch.zeros_like(locations)
    before[0, :3] = before[1, :6] = True  # tokens before their row's first image come back unchanged
    assert torch.equal(base[before], x[before])


def test_tokens_before_any_image_compute_as_the_text_model():
    model = _model().eval()
    _open_gates(model)
    tokens, locations, pixels = _batch()
    with torch.no_grad():
        text = model.text(tokens).logits
        seen = model(tokens, images=model.images(pixels, locations)).logits
    torch.testing.assert_close(seen[0, :3], text[0, :3], rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[1, :6], text[1, :6], rtol=0, atol=1e-5)
    assert (seen[0, 3:] - text[0, 3:]).abs().amax() > 1e-2  # the images do reach the tokens after them


def test_counts_match_the_modules_for_every_tower_preset():
    for name, tower in TOWER_PRESETS.items():
        cfg = VisionConfig.for_text(PRESETS["small"], tower, cross_attention_every=4)
        with torch.device("meta"):
            model = add_vision(build_model(PRESETS["small"], device="meta"), cfg)
        got = {k: sum(p.numel() for p in m.parameters()) for k, m in model.vision_modules().items()}
        counts = vision_param_counts(cfg)
        assert (counts.tower, counts.resampler, counts.cross_attention) == (got["tower"], got["resampler"],
                                                                           got["cross_attn"]), name


def test_mismatched_configs_and_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="made for a text model with d_model=64, 3 layers; this one has d_model=128"):
        add_vision(build_model(PRESETS["tiny"]), VisionConfig.for_text(TEXT, TOWER_PRESETS["tiny"]))
    with pytest.raises(ValueError, match="cross_attention_every=5 is more than the text model's 3 layers"):
        VisionConfig.for_text(TEXT, TOWER_PRESETS["tiny"], cross_attention_every=5)
    with pytest.raises(ValueError, match="hidden_size \\(50\\) is not divisible by n_heads \\(4\\)"):
        TowerConfig(hidden_size=50, n_heads=4)
    other = VisionTower(TowerConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, n_layers=1,
                                    n_heads=2))
    with pytest.raises(ValueError, match="vision tower's config"):
        add_vision(build_model(TEXT), VisionConfig.for_text(TEXT, TOWER_PRESETS["tiny"]), tower=other)
    model = _model()
    tokens, locations, pixels = _batch()
    with pytest.raises(ValueError, match=r"pixel values of shape \(3, 1, 64, 64\): this vision tower takes \(N, 3, 64"):
        model.images(pixels[:, :1], locations)
    with pytest.raises(ValueError, match="3 image tokens in the batch but 2 images"):
        model.images(pixels[:2], locations)


def test_image_attention_equals_a_per_token_reference():
    """attend_to_images reads only each row's own images; the oracle attends token by token to its image."""
    from moegpt.model.vision.cross_attention import attend_to_images

    g = torch.Generator().manual_seed(7)
    locations = torch.zeros(3, 12, dtype=torch.bool)
    locations[0, 2] = locations[0, 7] = locations[0, 9] = locations[2, 0] = True  # row 1 has no image
    images = ImageContext.from_locations(torch.zeros(4, 5, 8), locations)
    q = torch.randn(3, 2, 12, 8, generator=g)
    k, v = torch.randn(4, 5, 2, 8, generator=g), torch.randn(4, 5, 2, 8, generator=g)
    out = attend_to_images(q, k, v, images)
    for b in range(3):
        for t in range(12):
            if not images.sees_image[b, t]:
                continue
            i = int(images.image_of_token[b, t])
            p = torch.softmax(torch.einsum("hd,lhd->hl", q[b, :, t], k[i]) / 8 ** 0.5, dim=-1)  # (H, L)
            expected = torch.einsum("hl,lhd->hd", p, v[i])
            torch.testing.assert_close(out[b, :, t], expected, rtol=0, atol=1e-5)
    assert images.image_of_token[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert torch.isfinite(out).all()
