"""A quantized directory served unchanged: `moegpt serve` answers with the quantized model's greedy
tokens, and /metrics names the weights' scheme and the activation and KV-cache dtypes."""

import httpx

from moegpt.checkpoint.model_dir import load, save
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import QuantScheme
from tests.serve.conftest import make_model_dir, start_server, stop, wait_ready


def test_a_quantized_directory_serves_its_greedy_tokens_and_reports_its_dtypes(tmp_path):
    model, tok = load(make_model_dir(tmp_path / "base"))
    quantize_model(model, QuantScheme(bits=4, group_size=32))
    directory = save(model, tok, tmp_path / "int4")
    prompt = tok.encode("to be, or", add_special_tokens=True)
    want = LLMEngine(load(directory).model, EngineConfig(), tok).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    server = start_server(directory)
    try:
        wait_ready(server)
        r = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
            "model": server.model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want.text
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'moegpt:model_dtypes{activations="float32",kv_cache="float32",weights="int4-g32"} 1.0' in text
    finally:
        stop(server)
