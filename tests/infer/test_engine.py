"""The paged engine against plain contiguous-cache generation (the oracle)."""

import torch

from moegpt.config import preset
from moegpt.infer.engine import EngineConfig, LLMEngine, Request
from moegpt.infer.generate import generate
from moegpt.infer.paged_cache import kv_bytes_per_token
from moegpt.infer.sampling import SamplingParams
from moegpt.infer.scheduler import SchedulerConfig
from moegpt.model import build_model


def _model():
    cfg = preset("tiny").replace(vocab_size=256, n_layers=2, d_model=64, n_heads=4, d_ff=64, n_experts=8)
    model = build_model(cfg, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)  # sharper logits: greedy paths that differ per prompt
    return model.eval()


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_paged_continuous_batching_gives_the_same_greedy_tokens_as_plain_generation():
    model = _model()
    prompts = _prompts(9)
    # Tiny blocks, a small budget and few tokens per step: chunked prefill, block growth, preemption.
    cfg = EngineConfig(block_size=4, kv_cache_bytes=kv_bytes_per_token(model.cfg, torch.float32) * 4 * 12,
                       scheduler=SchedulerConfig(max_num_seqs=4, max_batched_tokens=16))
    engine = LLMEngine(model, cfg)
    preempted, schedule = [], engine.scheduler.schedule

    def watch():
        batch = schedule()
        preempted.extend(batch.preempted)
        return batch

    engine.scheduler.schedule = watch
    got = engine.generate(prompts, Request(max_tokens=12))
    assert preempted, "the budget must force preemption"
    for prompt, out in zip(prompts, got):
        expected = generate(model, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
        assert out == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefix_cache_hits_give_identical_outputs():
    model = _model()
    shared = _prompts(1, seed=5)[0] * 3  # a long common prefix
    prompts = [shared + [7], shared + [9, 11], shared + [7]]
    cached = LLMEngine(model, EngineConfig(block_size=4)).generate(prompts, Request(max_tokens=6))
    plain = LLMEngine(model, EngineConfig(block_size=4, prefix_caching=False)).generate(prompts, Request(max_tokens=6))
    assert cached == plain
    assert cached[0] == cached[2]


def test_seeded_sampling_is_the_same_alone_or_in_a_crowd():
    model = _model()
    prompts = _prompts(6, seed=1)
    req = Request(max_tokens=8, sampling=SamplingParams(temperature=1.0, top_k=20), seed=42)
    alone = LLMEngine(model).generate(prompts[:1], req)[0]
    crowd = LLMEngine(model).generate(prompts, req)[0]
    assert alone == crowd


def test_llm_generates_text_from_a_model_directory(tmp_path):
    from moegpt import LLM
    from moegpt.checkpoint.model_dir import save
    from moegpt.data.tokenizer import Tokenizer
    from moegpt.infer.sequence import FinishReason

    tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    model = build_model(preset("tiny").replace(vocab_size=300, n_layers=1), seed=0)
    save(model, tok, tmp_path)
    llm = LLM(tmp_path)
    completions = llm.generate(["to be", "question"], Request(max_tokens=5))
    assert [c.prompt for c in completions] == ["to be", "question"]
    for c in completions:
        assert c.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) and len(c.token_ids) <= 5
        prompt = torch.tensor([tok.encode(c.prompt, add_bos=True)])
        expected = generate(model, prompt, 5, eos_id=tok.eos_id)[0, prompt.shape[1]:].tolist()
        assert list(c.token_ids) == expected[:len(c.token_ids)]
