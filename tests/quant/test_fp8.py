"""FP8 (e4m3) weights: the scaled matmul against its fp32 definition, the float-quantized directory
against the compressed-tensors library, and the decode program on an fp8 model."""

import json

import pytest
import torch

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import preset
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model
from moegpt.quant.fp8 import E4M3, fp8_matmul, fp8_reference, quantize_fp8
from moegpt.quant.model import model_scheme, quantize_model
from moegpt.quant.scheme import dequantize, parse_scheme

FP8 = parse_scheme("fp8")


def test_a_weight_comes_back_within_e4m3s_step():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    values, scale = quantize_fp8(w, torch.float32)
    assert values.dtype == E4M3 and scale.shape == (64, 1)
    back = dequantize(values, scale, 8)
    assert ((back - w).abs() <= w.abs() / 16 + scale * 2 ** -9).all()  # 3 mantissa bits
    torch.testing.assert_close(back.abs().amax(-1), w.abs().amax(-1), rtol=1e-6, atol=0)  # each row's largest


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_the_scaled_matmul_is_its_fp32_definition(device):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 64, generator=g).to(device), torch.randn(5, 64, generator=g).to(device)
    values, scale = quantize_fp8(w, torch.float32)
    torch.testing.assert_close(fp8_matmul(x, values, scale), fp8_reference(x, values, scale), rtol=1e-5, atol=1e-4)


def _fp8_dir(path):
    model = build_model(preset("tiny").replace(vocab_size=256, n_layers=2, n_experts=4), seed=5).eval()
    save(quantize_model(model, FP8), None, path)
    return model


def test_a_float_quantized_directory_round_trips_and_the_library_reads_it(tmp_path):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model = _fp8_dir(tmp_path)
    loaded, _ = load(tmp_path)
    assert model_scheme(loaded) == FP8
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    assert qc.format == "float-quantized"
    tensors = load_file(tmp_path / "model.safetensors")
    base = "model.layers.1.block_sparse_moe.experts.2.w2"
    assert tensors[f"{base}.weight"].dtype == E4M3
    theirs = FloatQuantizationCompressor.decompress(
        {"weight": tensors[f"{base}.weight"], "weight_scale": tensors[f"{base}.weight_scale"]}, qc.config_groups["group_0"])
    experts = model.layers[1].ffn.experts
    assert torch.equal(theirs["weight"], dequantize(experts.parametrizations.w_down.original[2],
                                                    experts.parametrizations.w_down[0].scale[2], 8))


def test_an_fp8_tensor_without_its_scale_fails_at_load_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _fp8_dir(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.layers.0.self_attn.o_proj.weight_scale")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="fp8 tensor model.layers.0.self_attn.o_proj.weight has no weight_scale"):
        load(tmp_path)


@pytest.mark.slow
def test_transformers_reads_our_fp8_directory_as_its_dynamic_activation_scheme(tmp_path):
    """transformers 5.24 on CPU computes an fp8 directory with our weights, each Linear's input
    quantized per token to e4m3 on the fly (compressed-tensors' fake quantization: the attention
    projections and the LM head) but the experts' inputs not (transformers fuses Mixtral's experts
    into 3-D parameters, which that wrapping does not reach): our model with exactly that, to 1e-5.
    (The decode program quantizes the experts' inputs too, as vLLM's fp8 MoE does.)"""
    import types

    from transformers import AutoModelForCausalLM

    from moegpt.quant.fp8 import fp8_activation_values

    model = _fp8_dir(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    def per_token(x):  # (..., I) -> its e4m3 values per row, times their scales
        return fp8_activation_values(x.reshape(-1, x.shape[-1])).view_as(x)

    for block in model.layers:
        for linear in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo):
            linear.register_forward_pre_hook(lambda _, args: (per_token(args[0]),))
    model.head = types.MethodType(lambda self, h: per_token(h) @ self.lm_head.weight.t(), model)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_an_fp8_model_decodes_close_to_its_forward_and_serves():
    """Teacher-forced through the decode program (fp8 scaled matmuls, activations quantized per token),
    an fp8 model's logits follow its forward's (dequantized weights, activations unquantized) up to
    the activations' e4m3 rounding; the engine serves it, with an fp8 KV cache too."""
    from moegpt.infer.decode_eval import decoded_logits

    model = quantize_model(build_model(preset("tiny").replace(vocab_size=256, n_layers=2, n_experts=4), seed=5).eval(),
                           FP8)
    x = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    decoded = torch.stack(list(decoded_logits(model, x)), 1)
    with torch.no_grad():
        forward = model(x).logits
    assert (decoded.argmax(-1) == forward.argmax(-1)).float().mean() >= 0.9
    assert (decoded - forward).abs().max() < 0.2 * forward.abs().max()  # e4m3: 3 mantissa bits per activation
    prompt = x[0, :6].tolist()
    for kv in ("auto", "fp8"):
        out = LLMEngine(model, EngineConfig(kv_cache_dtype=kv)).generate([prompt], SamplingParams(max_tokens=8,
                                                                                                  temperature=0))
        tokens = out[0].outputs[0].token_ids
        assert len(tokens) == 8 and tokens[0] == int(forward[0, 5].argmax())  # the first from the prefill's forward
