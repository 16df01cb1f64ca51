"""Logit parity with transformers' MixtralForCausalLM, both ways (fp32, random weights)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity needs the dev extra (transformers)")

from moegpt.checkpoint.model_dir import load, save  # noqa: E402
from moegpt.config import MLPKind, PRESETS, RopeScaling  # noqa: E402
from moegpt.model import build_model  # noqa: E402


def _hf_model(n_kv_heads: int, tie: bool = False):
    cfg = transformers.MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, rope_theta=10_000.0, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and some weights tiny; randomise everything
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("n_kv_heads", [1, 2], ids=["mqa", "gqa"])
def test_hf_saved_mixtral_gives_same_logits_in_moegpt(tmp_path, n_kv_heads):
    hf = _hf_model(n_kv_heads)
    hf.save_pretrained(tmp_path)
    ours, _ = load(tmp_path)
    tokens = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_moegpt_saved_model_gives_same_logits_in_transformers(tmp_path):
    cfg = PRESETS["tiny"].replace(vocab_size=211, n_layers=2, d_model=64, n_heads=4, d_ff=96, n_experts=4)
    ours = build_model(cfg, seed=3).eval()
    save(ours, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 211, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_gelu_experts_refuse_to_save_as_mixtral(tmp_path):
    cfg = PRESETS["tiny"].replace(mlp=MLPKind.GELU, n_layers=1)
    with pytest.raises(ValueError, match="mlp=gelu"):
        save(build_model(cfg), None, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_sharded_and_tied_hf_directories_load(tmp_path):
    hf = _hf_model(2, tie=True)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, tokenizer = load(tmp_path)
    assert ours.cfg.tie_embeddings and tokenizer is None
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-4


def test_corrupt_or_missing_model_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope")
    hf = _hf_model(1)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read weights"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path)


def test_fused_expert_layout_of_transformers_5_loads(tmp_path):
    hf = _hf_model(1)
    hf.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    ours, _ = load(tmp_path)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-4


# Each scaled RoPE as transformers 5 stores it, with positions well past the original context (32).
SCALINGS = {
    "linear": (dict(rope_type="linear", factor=4.0), 128),
    "dynamic": (dict(rope_type="dynamic", factor=4.0), 32),  # transformers' dynamic base grows past max_position_embeddings
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32), 128),
    "yarn-options": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=16.0,
                          beta_slow=2.0, attention_factor=1.3, truncate=False), 128),
}


def _scaled_hf_model(name: str):
    params, max_positions = SCALINGS[name]
    cfg = transformers.MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=max_positions, rope_parameters={"rope_theta": 10_000.0, **params},
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # large enough that the rope's frequencies move the logits well past 1e-4
    return model


def _unscaled_logits(model, tokens):
    plain = build_model(model.cfg.replace(rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        return plain(tokens).logits


@pytest.mark.parametrize("name", list(SCALINGS))
def test_hf_scaled_rope_gives_same_logits_in_moegpt_past_the_original_context(tmp_path, name):
    hf = _scaled_hf_model(name)
    hf.save_pretrained(tmp_path)
    ours, _ = load(tmp_path)
    assert ours.cfg.rope_scaling is not None and ours.cfg.rope_scaling.type.value == name.split("-")[0]
    for T in (20, 128):  # a dynamic base depends on the forward's length
        tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            expected = hf(tokens).logits
            got = ours(tokens).logits
        assert (got - expected).abs().max().item() <= 1e-4
    # the scaling is not a no-op here: plain RoPE gives other logits past the original context
    assert (_unscaled_logits(ours, tokens) - expected)[:, 40:].abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn"])
def test_moegpt_scaled_rope_gives_same_logits_in_transformers_and_round_trips(tmp_path, name):
    scaling = RopeScaling(type=name, factor=4.0, original_max_seq_len=32)
    cfg = PRESETS["tiny"].replace(vocab_size=211, n_layers=2, d_model=64, n_heads=4, d_ff=96, n_experts=4,
                                  max_seq_len=128, rope_scaling=scaling)
    ours = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    save(ours, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 211, (2, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(tokens).logits
        assert (hf(tokens).logits - expected).abs().max().item() <= 1e-4
    assert (_unscaled_logits(ours, tokens) - expected)[:, 40:].abs().max().item() > 1e-2
    back, _ = load(tmp_path)
    assert back.cfg == cfg


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn"])
def test_the_legacy_rope_scaling_key_loads_as_rope_parameters(tmp_path, name):
    import json

    hf = _scaled_hf_model(name)
    hf.save_pretrained(tmp_path)
    modern, _ = load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}  # transformers 4's form
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    legacy, _ = load(tmp_path)
    assert legacy.cfg == modern.cfg


@pytest.mark.parametrize("change, message", [
    ({"rope_type": "llama3", "factor": 8.0}, "rope_type='llama3' is not supported"),
    ({"rope_type": "linear", "factor": 1.0}, "factor=1.0 must be a number > 1"),
    ({"rope_type": "linear", "factor": 0.5}, "factor=0.5 must be a number > 1"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.7},
     r"rope parameters \['mscale'\] are not supported"),
])
def test_unsupported_or_bad_rope_parameters_are_one_line_errors(tmp_path, change, message):
    import json

    _hf_model(1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10_000.0, **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as e:
        load(tmp_path)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
