"""The engine on a CUDA device (marked ``gpu``: skipped without one): the decode program in PyTorch
ops on the GPU, the step metadata, sampling and generators on the model's device. The same checks
as on the CPU: greedy tokens equal the plain model's, speculative decoding is exact, a sequence's
tokens do not depend on its neighbours, a seed reproduces a sample."""

import pytest
import torch

from moegpt.config import preset
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.speculative import SpeculativeConfig
from moegpt.model import build_model

pytestmark = pytest.mark.gpu

CFG = preset("tiny").replace(vocab_size=512, n_layers=2, d_model=64, n_heads=4, d_ff=96, n_experts=8)


def _model(seed=0, dtype=torch.float32, **kw):
    model = build_model(CFG.replace(**kw), seed=seed, dtype=dtype).eval().to("cuda")
    with torch.no_grad():
        for p in model.parameters():  # wider logit margins: greedy ties are not what is tested
            p.mul_(4)
    return model


def _prompts(n=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG.vocab_size, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (n,), generator=g)]


@torch.no_grad()
def _greedy_plain(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_greedy_tokens_on_cuda_equal_the_plain_models():
    model = _model()
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20))
    prompts = _prompts()
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == _greedy_plain(model, prompt, 12)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_speculative_greedy_on_cuda_equals_plain_greedy():
    model, draft = _model(), _model(seed=1, n_layers=1)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20)).generate(_prompts(), params)
    spec = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20, speculative=SpeculativeConfig(num_tokens=3)),
                     draft=draft).generate(_prompts(), params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]


def test_a_sequences_tokens_on_cuda_do_not_depend_on_its_neighbours():
    model = _model()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = _prompts(6)
    alone = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20)).generate(prompts[:1], params)
    crowd = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20)).generate(prompts, params)
    assert crowd[0].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_a_seed_reproduces_a_sample_on_cuda():
    model = _model()
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20)).generate(_prompts(), params)
    b = LLMEngine(model, EngineConfig(kv_cache_bytes=8 * 2**20)).generate(_prompts(), params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
