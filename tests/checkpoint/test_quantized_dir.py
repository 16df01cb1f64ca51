"""Quantized model directories (compressed-tensors pack-quantized): the round trip, what the
compressed-tensors library and transformers read from them, and load-time validation that names
the bad tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import preset
from moegpt.model import build_model
from moegpt.quant.model import is_quantized, model_scheme, quantize_model
from moegpt.quant.scheme import QuantScheme, dequantize

SCHEMES = [QuantScheme(bits=8), QuantScheme(bits=4, group_size=32)]


def _quantized_dir(path, scheme, dtype=torch.float32, embedding=False):
    model = build_model(preset("tiny").replace(vocab_size=256, n_layers=2, n_experts=4), seed=5, dtype=dtype).eval()
    quantize_model(model, scheme, embedding)
    save(model, None, path)
    return model


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_gives_the_same_model(tmp_path, scheme, dtype):
    model = _quantized_dir(tmp_path, scheme, dtype)
    loaded, _ = load(tmp_path)
    assert model_scheme(loaded) == scheme and loaded.norm.weight.dtype == dtype
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight_packed"].dtype == torch.int32
    assert tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight_scale"].dtype == dtype
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors  # the router stays full precision


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_quantized_embedding_table_round_trips_under_the_embedding_target(tmp_path, scheme):
    model = _quantized_dir(tmp_path, scheme, embedding=True)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["targets"] == ["Linear", "Embedding"]
    tensors = load_file(tmp_path / "model.safetensors")
    assert "model.embed_tokens.weight" not in tensors
    assert tensors["model.embed_tokens.weight_packed"].shape == (256, 128 * scheme.bits // 32)
    loaded, _ = load(tmp_path)
    assert is_quantized(loaded.embed, "weight")
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_the_compressed_tensors_library_reads_our_config_and_weights(tmp_path, scheme):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = _quantized_dir(tmp_path, scheme)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    group = qc.config_groups["group_0"]
    tensors = load_file(tmp_path / "model.safetensors")
    base = "model.layers.0.block_sparse_moe.experts.2.w1"
    theirs = PackedQuantizationCompressor.decompress({s: tensors[f"{base}.{s}"] for s in
                                                      ("weight_packed", "weight_scale", "weight_shape")}, group)
    experts = model.layers[0].ffn.experts
    packed, dq = experts.parametrizations.w_gate.original, experts.parametrizations.w_gate[0]
    assert torch.equal(theirs["weight"], dequantize(packed[2], dq.scale[2], scheme.bits))
    _quantized_dir(tmp_path, scheme, embedding=True)  # and an embedding table
    tensors = load_file(tmp_path / "model.safetensors")
    theirs = PackedQuantizationCompressor.decompress({s: tensors[f"model.embed_tokens.{s}"] for s in
                                                      ("weight_packed", "weight_scale", "weight_shape")}, group)
    assert torch.equal(theirs["weight"], load(tmp_path)[0].embed.weight)


@pytest.mark.slow
@pytest.mark.parametrize("embedding", [False, True])
def test_transformers_loads_the_directory_and_gives_our_logits(tmp_path, embedding):
    """A quantized embedding table loads with ``CompressedTensorsConfig(dequantize=True)``: transformers
    5.24's default path initialises an Embedding's ``weight``, which compressed-tensors replaced."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _quantized_dir(tmp_path, QuantScheme(bits=4, group_size=32), embedding=embedding)
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if embedding else {}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, **options).eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


BASE = "model.layers.1.block_sparse_moe.experts.3.w3"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{BASE}.weight_scale"), f"quantized weight {BASE} has no tensor {BASE}.weight_scale"),
    (lambda t: [t.pop(f"{BASE}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")],
     f"experts are quantized but {BASE}.weight_packed is missing"),
    (lambda t: t.update({f"{BASE}.weight_scale": torch.ones(4, 256, 1)}),  # one scale for every expert
     rf"{BASE}.weight_scale is torch.float32 \(4, 256, 1\), int4-g32 of \[256, 128\] has a floating scale of shape \(256, 4\)"),
    (lambda t: t.update({f"{BASE}.weight_packed": t[f"{BASE}.weight_packed"][:, :4].contiguous()}),
     rf"{BASE}.weight_packed is torch.int32 \(256, 4\), int4-g32 of \[256, 128\] is torch.int32 \(256, 16\)"),
    (lambda t: t.update({f"{BASE}.weight_shape": torch.tensor([256, 32])}),
     rf"{BASE}.weight_shape is \[256, 32\], the config implies \[256, 128\]"),
    (lambda t: t.update({"model.layers.0.block_sparse_moe.experts.weight_packed": torch.zeros(4, 2, dtype=torch.int32),
                         "model.layers.0.block_sparse_moe.experts.weight_scale": torch.ones(4, 1),
                         "model.layers.0.block_sparse_moe.experts.weight_shape": torch.tensor([4, 16])}),
     "unexpected quantized tensor model.layers.0.block_sparse_moe.experts.weight_packed"),
    (lambda t: t.update({f"{BASE}.weight_scale": -t[f"{BASE}.weight_scale"]}), "not finite and positive"),
])
def test_a_broken_quantized_directory_fails_at_load_naming_the_tensor(tmp_path, edit, message):
    _quantized_dir(tmp_path, QuantScheme(bits=4, group_size=32))
    _rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_an_embedding_table_at_odds_with_the_config_fails_at_load_naming_it(tmp_path):
    _quantized_dir(tmp_path, QuantScheme(bits=8), embedding=True)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["Linear"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected quantized tensor model.embed_tokens.weight_packed"):
        load(tmp_path)
    _quantized_dir(tmp_path, QuantScheme(bits=8))  # a full-precision table under a config that targets it
    config = json.loads(path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["Linear", "Embedding"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="targets Embedding but model.embed_tokens.weight_packed is missing"):
        load(tmp_path)


def test_a_quantized_table_in_a_tied_model_fails_at_load_naming_it(tmp_path):
    from moegpt.checkpoint.partial import load_part

    _quantized_dir(tmp_path, QuantScheme(bits=8), embedding=True)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = True
    path.write_text(json.dumps(config))
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("lm_head.")])
    for read in (load, lambda d: load_part(d, lambda name: ())):  # one process, and a serving rank
        with pytest.raises(ValueError, match="model.embed_tokens is quantized but the model ties its LM head"):
            read(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("quant_method", "gptq", "quant_method='gptq' is not supported"),
    ("format", "marlin-24", "quantization format 'marlin-24' is not supported"),
    ("format", "float-quantized", "'float-quantized' is supported as fp8 weights per channel"),  # int weights in it
])
def test_an_unsupported_quantization_config_is_one_line(tmp_path, field, value, message):
    _quantized_dir(tmp_path, QuantScheme(bits=8))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"][field] = value
    if field == "format":
        config["quantization_config"]["config_groups"]["group_0"]["format"] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


@pytest.mark.parametrize("scheme,per_weight", [(QuantScheme(bits=8), 1), (QuantScheme(bits=4, group_size=32), 0.5)])
def test_the_planner_counts_a_quantized_directory_s_bytes_per_weight(tmp_path, capsys, scheme, per_weight):
    from moegpt.cli import main

    _quantized_dir(tmp_path, scheme)
    assert main(["plan", "--model", str(tmp_path), "--hardware", "h100-sxm", "--json"]) == 0
    precision = json.loads(capsys.readouterr().out)["inputs"]["precision"]
    assert precision["weight_bytes"] == per_weight and precision["kv_bytes"] == 4  # the KV stays the stored dtype
