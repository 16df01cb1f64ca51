"""Logit parity with transformers' MixtralForCausalLM, both ways (fp32, random weights)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity needs the dev extra (transformers)")

from moegpt.checkpoint.model_dir import load, save  # noqa: E402
from moegpt.config import MLPKind, PRESETS  # noqa: E402
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


def test_scaled_rope_is_refused_rather_than_silently_wrong(tmp_path):
    import json

    _hf_model(1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type='linear' is not supported"):
        load(tmp_path)
