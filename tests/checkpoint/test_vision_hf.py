"""Vision towers against transformers' CLIPVisionModel / SiglipVisionModel (fp32, random weights,
odd sizes), both key layouts, both ways; and the vision model directory."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="HF parity needs the dev extra (transformers)")

from moegpt.checkpoint.model_dir import load, save  # noqa: E402
from moegpt.checkpoint.vision_hf import load_tower, save_tower  # noqa: E402
from moegpt.config import PRESETS  # noqa: E402
from moegpt.model import build_model  # noqa: E402
from moegpt.model.vision.vision_model import VisionMoEGPT, add_vision  # noqa: E402
from moegpt.vision_config import TOWER_PRESETS, TowerConfig, VisionConfig  # noqa: E402

SIZES = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3, image_size=31,
             patch_size=7, num_channels=3)  # odd sizes: 31 // 7 leaves a strip the conv skips


def _hf_tower(kind: str, **extra):
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SIZES, **extra))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIZES, **extra))
    torch.manual_seed(0)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise everything
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _prefix(directory) -> None:
    """Rewrite a transformers 5 directory in the hub's ``vision_model.``-prefixed layout."""
    tensors = load_file(directory / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in tensors.items()}, directory / "model.safetensors")


CASES = [("clip", {}), ("siglip", {}), ("siglip", {"vision_use_head": False}), ("clip", {"hidden_act": "gelu"})]


@pytest.mark.parametrize("layout", ["unprefixed", "prefixed"])
@pytest.mark.parametrize("kind,extra", CASES, ids=["clip", "siglip", "siglip-no-head", "clip-gelu"])
def test_hf_tower_gives_same_features_in_moegpt(tmp_path, kind, extra, layout):
    hf = _hf_tower(kind, **extra)
    hf.save_pretrained(tmp_path)
    if layout == "prefixed":
        _prefix(tmp_path)
    ours = load_tower(tmp_path).eval()
    pixels = torch.randn(3, 3, 31, 31, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=pixels)
        got = ours(pixels)
    assert (got.hidden - expected.last_hidden_state).abs().max().item() <= 1e-5
    if kind == "clip" or extra.get("vision_use_head", True):
        assert (got.pooled - expected.pooler_output).abs().max().item() <= 1e-5
    else:
        assert got.pooled is None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_moegpt_saved_tower_loads_in_transformers(tmp_path, kind):
    cfg = TowerConfig(kind=kind, image_size=31, patch_size=7, hidden_size=36, intermediate_size=52, n_layers=2,
                      n_heads=3, hidden_act="quick_gelu" if kind == "clip" else "gelu_pytorch_tanh",
                      use_head=kind == "siglip", layer_norm_eps=1e-5 if kind == "clip" else 1e-6)
    hf = _hf_tower(kind)
    hf.save_pretrained(tmp_path / "a")
    ours = load_tower(tmp_path / "a")
    assert ours.cfg == cfg
    save_tower(ours, tmp_path / "b")
    cls = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
    back = cls.from_pretrained(tmp_path / "b").eval()
    pixels = torch.randn(2, 3, 31, 31)
    with torch.no_grad():
        assert torch.equal(back(pixel_values=pixels).last_hidden_state, hf(pixel_values=pixels).last_hidden_state)


def test_whole_clip_model_directory_gives_its_vision_tower(tmp_path):
    config = transformers.CLIPConfig(vision_config=SIZES, text_config=dict(hidden_size=32, intermediate_size=37,
                                     num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    clip = transformers.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    ours = load_tower(tmp_path).eval()
    pixels = torch.randn(2, 3, 31, 31)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state
        assert (ours(pixels).hidden - expected).abs().max().item() <= 1e-5


def test_tower_directory_errors_name_the_problem(tmp_path):
    hf = _hf_tower("clip")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ValueError, match=r"class_embedding' has shape \(36,\), the config implies \(48,\)"):
        load_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    with pytest.raises(ValueError, match="model_type='mixtral' is not a vision tower"):
        load_tower(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_tower(tmp_path / "nowhere")


def _vision_model():
    cfg = PRESETS["tiny"].replace(vocab_size=211, n_layers=3, d_model=64, n_heads=4, d_ff=96, n_experts=4)
    text = build_model(cfg, seed=3)
    vcfg = VisionConfig.for_text(cfg, TOWER_PRESETS["tiny"], n_latents=8, resampler_heads=2, resampler_head_dim=16,
                                 cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_every=2)
    model = add_vision(text, vcfg, seed=4)
    with torch.no_grad():
        for block in model.cross_attn.values():  # open the gates so the images matter
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(-0.5)
    return model.eval()


def _inputs():
    tokens = torch.randint(0, 211, (2, 14), generator=torch.Generator().manual_seed(5))
    locations = torch.zeros(2, 14, dtype=torch.bool)
    locations[0, 2] = locations[0, 9] = locations[1, 4] = True
    return tokens, locations, torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))


def test_vision_model_directory_round_trips_and_its_parts_load_in_transformers(tmp_path):
    model = _vision_model()
    save(model, None, tmp_path)
    back, _ = load(tmp_path)
    assert isinstance(back, VisionMoEGPT)
    tokens, locations, pixels = _inputs()
    with torch.no_grad():
        expected = model(tokens, images=model.images(pixels, locations)).logits
        assert torch.equal(back(tokens, images=back.images(pixels, locations)).logits, expected)
    text_only, _ = load(tmp_path, text_only=True)
    assert not isinstance(text_only, VisionMoEGPT)
    hf_text = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    hf_tower = transformers.CLIPVisionModel.from_pretrained(tmp_path / "vision_tower").eval()
    with torch.no_grad():
        assert (hf_text(tokens).logits - model.text(tokens).logits).abs().max() <= 1e-4
        assert (hf_tower(pixel_values=pixels).last_hidden_state - model.tower(pixels).hidden).abs().max() <= 1e-5


def test_vision_model_directory_with_a_missing_or_mismatched_part_is_one_line_error(tmp_path):
    save(_vision_model(), None, tmp_path)
    adapter = tmp_path / "vision_adapter.safetensors"
    saved = adapter.read_bytes()
    adapter.unlink()
    with pytest.raises(ValueError, match="vision_adapter.safetensors is missing"):
        load(tmp_path)
    adapter.write_bytes(saved)
    config_path = tmp_path / "vision_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "text_d_model": 128}))
    with pytest.raises(ValueError, match="made for a text model with d_model=128"):
        load(tmp_path)
    config_path.write_text(json.dumps({**config, "n_latents": 9}))
    with pytest.raises(ValueError, match=r"resampler.latents' has shape \(8, 128\), vision_config.json implies"):
        load(tmp_path)
    config_path.write_text(json.dumps({**config, "tower": {**config["tower"], "n_layers": 3}}))
    with pytest.raises(ValueError, match="the tower's config differs"):
        load(tmp_path)
    config_path.write_text(json.dumps(config))
    (tmp_path / "vision_tower" / "config.json").unlink()
    with pytest.raises(ValueError, match="vision_tower/config.json is missing"):
        load(tmp_path)


def test_the_recorded_io_per_token_reads_back_and_a_bad_record_is_one_line(tmp_path):
    from moegpt.checkpoint.vision_dir import IO_FILE, read_vision_io, write_vision_io

    assert read_vision_io(tmp_path) is None  # no record: the planner takes the flags' values
    write_vision_io(tmp_path, {"shapes_png_bytes_per_token": 9.0, "shapes_pixel_bytes_per_token": 700.0,
                               "screenshots_png_bytes_per_token": 50.0, "screenshots_pixel_bytes_per_token": 800.0,
                               "text_bytes_per_token": 3.0})
    assert read_vision_io(tmp_path) == {"text_bytes_per_token": 3.0, "vision_bytes_per_token": 750.0}
    (tmp_path / IO_FILE).write_text('{"text_bytes_per_token": 3, "vision_bytes_per_token": -1}')
    with pytest.raises(ValueError, match=r"vision_io.json: vision_bytes_per_token=-1 is not a positive number"):
        read_vision_io(tmp_path)
