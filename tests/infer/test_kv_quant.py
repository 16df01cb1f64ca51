"""The 8-bit KV cache (--kv-cache-dtype int8 / fp8): its quantization, the C++ decode layer against
the pure-PyTorch program on it, and the engine's bookkeeping (preemption, prefix caching, the
budget in bytes) unchanged by it."""

import json

import pytest
import torch

import moegpt.infer.decode as decode
from moegpt.infer.decode import decode_step, kernel_layers_apply
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.cli import main as cli_main
from moegpt.config import preset
from moegpt.counts import KV_SCALE_BYTES, kv_cache_bytes_per_token
from moegpt.infer.kv_quant import KV_DTYPES, QuantizedSlots, dequantize_kv, quantize_kv
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import SchedulerConfig
from tests.infer.test_engine import _first_tokens, _model, _prompts
from tests.kernels.test_decode_layer import _model as _layer_model, _step

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.mark.parametrize("kind", list(KV_DTYPES))
def test_a_head_comes_back_within_its_format_step(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, 64, generator=g) * torch.rand(50, 2, 1, generator=g) * 10
    x[3, 1] = 0.0  # an all-zero head
    values, scales = quantize_kv(x, KV_DTYPES[kind])
    back = dequantize_kv(values, scales, torch.float32)
    assert values.dtype == KV_DTYPES[kind] and scales.shape == (50, 2)
    if kind == "int8":
        assert ((back - x).abs() <= scales[..., None] / 2 + 1e-6).all()
    else:  # e4m3: 3 mantissa bits, so within 1/16 of each value (plus the subnormal step near 0)
        assert ((back - x).abs() <= x.abs() / 16 + scales[..., None] * 2 ** -9).all()
    assert torch.equal(back[3, 1], torch.zeros(64))


def test_slots_are_written_quantized_and_read_back_dequantized():
    slots = QuantizedSlots(10, 1, 32, torch.int8, torch.float32)
    rows = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(1))
    slots.index_copy_(0, torch.tensor([7, 2, 5]), rows)
    got = slots.index_select(0, torch.tensor([2, 5, 7]))
    torch.testing.assert_close(got, rows[[1, 2, 0]], atol=rows.abs().max().item() / 127, rtol=0)
    assert slots.nbytes() == 10 * (32 + KV_SCALE_BYTES)


def _quantized_caches(caches, storage):
    out = []
    for c in caches:
        q = QuantizedSlots(*c.shape, storage, c.dtype)
        q.index_copy_(0, torch.arange(c.shape[0]), c)
        out.append(q)
    return out


@pytest.mark.parametrize("kind", list(KV_DTYPES))
@pytest.mark.parametrize("batch", [1, 6])
def test_the_fused_layer_on_an_8bit_cache_is_the_pytorch_program(kind, batch, monkeypatch):
    model = _layer_model(torch.float32)
    lens = [150, 7, 90, 33, 64, 1][:batch]
    w, tokens, positions, k, v, meta = _step(model, lens, 8)
    k, v = _quantized_caches(k, KV_DTYPES[kind]), _quantized_caches(v, KV_DTYPES[kind])
    k2, v2 = _quantized_caches([c.index_select(0, torch.arange(c.shape[0])) for c in k], KV_DTYPES[kind]), \
        _quantized_caches([c.index_select(0, torch.arange(c.shape[0])) for c in v], KV_DTYPES[kind])
    assert kernel_layers_apply(w, w.embed(tokens), k)
    got, _ = decode_step(w, tokens, positions, k, v, meta)
    with monkeypatch.context() as m:
        m.setattr(decode, "kernel_layers_apply", lambda *a: False)
        want, _ = decode_step(w, tokens, positions, k2, v2, meta)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(k + v, k2 + v2):  # the new keys and values written alike (up to one step where an
        assert (a.values.float() - b.values.float()).abs().max() <= 1  # fp32 rounding apart lands across a step)


@pytest.mark.parametrize("kind", list(KV_DTYPES))
def test_an_8bit_cache_gives_the_same_tokens_under_preemption_and_prefix_caching(kind):
    model = _model()
    prompts = _prompts(8)
    roomy = _first_tokens(LLMEngine(model, EngineConfig(kv_cache_dtype=kind, prefix_caching=False)).generate(prompts, GREEDY))
    per_token = kv_cache_bytes_per_token(model.cfg, 1, KV_SCALE_BYTES)
    tight = LLMEngine(model, EngineConfig(kv_cache_dtype=kind, block_size=4, kv_cache_bytes=per_token * 4 * 12,
                                          scheduler=SchedulerConfig(max_num_seqs=4, max_batched_tokens=16)))
    assert tight.stats.kv_blocks_total == 12  # the budget counts the 8-bit values and their scales
    preempted, schedule = [], tight.scheduler.schedule
    tight.scheduler.schedule = lambda: (b := schedule(), preempted.extend(b.preempted))[0]
    assert _first_tokens(tight.generate(prompts, GREEDY)) == roomy
    assert preempted and tight.blocks.num_free_blocks == tight.blocks.num_blocks
    shared = [prompts[0] * 3 + [7], prompts[0] * 3 + [9]]
    cached = LLMEngine(model, EngineConfig(kv_cache_dtype=kind, block_size=4))
    assert _first_tokens(cached.generate(shared, GREEDY)) == \
        _first_tokens(LLMEngine(model, EngineConfig(kv_cache_dtype=kind, block_size=4, prefix_caching=False))
                      .generate(shared, GREEDY))


def test_an_8bit_cache_holds_four_times_the_tokens_of_an_fp32_one_in_the_same_bytes():
    model = _model()
    full = LLMEngine(model, EngineConfig(kv_cache_bytes=2**22)).stats.kv_blocks_total
    eight = LLMEngine(model, EngineConfig(kv_cache_bytes=2**22, kv_cache_dtype="int8")).stats.kv_blocks_total
    Dh = model.cfg.head_dim
    assert eight == 2**22 // (2 * model.cfg.n_layers * model.cfg.n_kv_heads * (Dh + 4) * 16)
    assert eight / full == pytest.approx(4 * Dh / (Dh + 4), rel=0.01)


def test_an_unknown_kv_cache_dtype_is_one_line():
    with pytest.raises(ValueError, match="kv cache dtype 'int4' is not one of auto, int8, fp8"):
        EngineConfig(kv_cache_dtype="int4")


def test_the_planner_counts_the_8bit_cache_as_the_engine_budgets_it(capsys):
    assert cli_main(["plan", "--preset", "small", "--hardware", "h100-sxm", "--batch", "1", "--context", "1024",
                     "--kv-cache-dtype", "int8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["memory"]["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(preset("small"), 1, KV_SCALE_BYTES)
    assert plan["memory"]["kv_cache_bytes_per_token"] == 2 * 12 * (64 + 4)  # small: 12 layers, one kv head of 64
