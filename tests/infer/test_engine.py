"""The paged engine against plain contiguous-cache generation (the oracle)."""

import pytest
import torch

from moegpt.config import preset
from moegpt.counts import kv_cache_bytes_per_token
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.generate import generate
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import SchedulerConfig
from moegpt.model import build_model

FP32_KV_BYTES = 4  # bytes per cached value in these fp32 tests

GREEDY = dict(temperature=0.0)


def _first_tokens(outputs) -> list[list[int]]:
    """Each RequestOutput's first completion, as a list of token ids."""
    return [list(o.outputs[0].token_ids) for o in outputs]


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
    cfg = EngineConfig(block_size=4, kv_cache_bytes=kv_cache_bytes_per_token(model.cfg, FP32_KV_BYTES) * 4 * 12,
                       scheduler=SchedulerConfig(max_num_seqs=4, max_batched_tokens=16))
    engine = LLMEngine(model, cfg)
    preempted, schedule = [], engine.scheduler.schedule

    def watch():
        batch = schedule()
        preempted.extend(batch.preempted)
        return batch

    engine.scheduler.schedule = watch
    got = _first_tokens(engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY)))
    assert preempted, "the budget must force preemption"
    for prompt, out in zip(prompts, got):
        expected = generate(model, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
        assert out == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefix_cache_hits_give_identical_outputs():
    model = _model()
    shared = _prompts(1, seed=5)[0] * 3  # a long common prefix
    prompts = [shared + [7], shared + [9, 11], shared + [7]]
    params = SamplingParams(max_tokens=6, **GREEDY)
    cached = _first_tokens(LLMEngine(model, EngineConfig(block_size=4)).generate(prompts, params))
    plain = _first_tokens(LLMEngine(model, EngineConfig(block_size=4, prefix_caching=False)).generate(prompts, params))
    assert cached == plain
    assert cached[0] == cached[2]


def _one_at_a_time(engine, prompts, params):
    """Each prompt after the previous one finished, so each can find the blocks of those before it."""
    return [_first_tokens(engine.generate([p], params))[0] for p in prompts]


def test_prefix_cache_with_colliding_hashes_still_gives_each_prompt_its_own_output(monkeypatch):
    import moegpt.infer.block_manager as block_manager

    model = _model()
    x, y, z, w = (_prompts(1, seed=s)[0][:4] * 2 for s in (11, 12, 13, 14))  # 8 tokens: two blocks of 4
    x, y, z, w = ([t % 200 + 3 + i for t in part] for i, part in enumerate((x, y, z, w)))  # all different
    prompts = [x + y + [7], z + y + [9], x + w + [3], x + y + [7], w + [5]]
    params = SamplingParams(max_tokens=6, **GREEDY)
    plain = LLMEngine(model, EngineConfig(block_size=4, prefix_caching=False))
    expected = _one_at_a_time(plain, prompts, params)
    monkeypatch.setattr(block_manager, "chain_hash", lambda previous, tokens: b"\0" * 32)  # every block one name
    cached = LLMEngine(model, EngineConfig(block_size=4))
    assert _one_at_a_time(cached, prompts, params) == expected
    assert cached.stats.prompt_tokens < plain.stats.prompt_tokens  # verified hits were still taken
    # The test has teeth: trusting the name alone reuses another prompt's keys and values.
    monkeypatch.setattr(block_manager.BlockManager, "_lookup", lambda self, name, tokens, parent:
                        self.cached[self.block_of[name]] if name in self.block_of else None)
    trusting = LLMEngine(model, EngineConfig(block_size=4))
    assert _one_at_a_time(trusting, prompts, params) != expected


def test_block_names_are_sha256_chained_over_the_token_ids():
    import hashlib
    import struct

    from moegpt.infer.block_manager import ROOT, chain_hash

    first = chain_hash(ROOT, (1, 2, 3))
    assert first == hashlib.sha256(bytes(32) + struct.pack("<3q", 1, 2, 3)).digest()
    assert chain_hash(first, (4,)) != chain_hash(chain_hash(ROOT, (9, 2, 3)), (4,))  # the prefix is in the name


def test_seeded_sampling_is_the_same_alone_or_in_a_crowd():
    model = _model()
    prompts = _prompts(6, seed=1)
    req = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=42)
    alone = _first_tokens(LLMEngine(model).generate(prompts[:1], req))[0]
    crowd = _first_tokens(LLMEngine(model).generate(prompts, req))[0]
    assert alone == crowd


def test_llm_generates_text_from_a_model_directory(tmp_path):
    from moegpt import LLM
    from moegpt.checkpoint.model_dir import save
    from moegpt.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    model = build_model(preset("tiny").replace(vocab_size=300, n_layers=1), seed=0)
    save(model, tok, tmp_path)
    llm = LLM(model=tmp_path)
    outputs = llm.generate(["to be", "question"], SamplingParams(max_tokens=5, **GREEDY))
    assert [o.prompt for o in outputs] == ["to be", "question"]
    for o in outputs:
        c = o.outputs[0]
        assert o.prompt_token_ids == tuple(tok.encode(o.prompt, add_special_tokens=True)) and o.finished
        prompt = torch.tensor([o.prompt_token_ids])
        expected = generate(model, prompt, 5, eos_id=tok.eos_id)[0, prompt.shape[1]:].tolist()
        if tok.eos_id in expected:  # the oracle ends at eos (the stop token is kept in the token ids)
            expected = expected[:expected.index(tok.eos_id) + 1]
        assert list(c.token_ids) == expected  # every token, not a prefix of them (an empty output fails)
        assert c.finish_reason == ("stop" if expected[-1] == tok.eos_id else "length")
        assert c.text == tok.decode([t for t in expected if t != tok.eos_id])


def _engine_with_tokenizer(tmp_path):
    from moegpt.checkpoint.model_dir import save
    from moegpt.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    model = build_model(preset("tiny").replace(vocab_size=300, n_layers=1), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    save(model, tok, tmp_path)
    return model.eval(), tok


def test_n_completions_are_distinct_and_reproducible_with_a_seed():
    model = _model()
    req = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=5)

    def run():
        engine = LLMEngine(model)
        rid = engine.add_request(_prompts(1)[0], req)
        out = {i: [] for i in range(3)}
        while engine.has_work:
            for u in engine.step():
                assert u.request_id == rid
                out[u.index].extend(u.new_token_ids)
        return [tuple(v) for v in out.values()]

    first = run()
    assert first == run()
    assert len(set(first)) == 3


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token():
    model = _model()
    prompt = _prompts(1, seed=3)[0]
    engine = LLMEngine(model)
    updates = list(engine.stream(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=1, logprobs=3)))
    tokens = [t for u in updates for t in u.new_token_ids]
    lps = [lp for u in updates for lp in u.logprobs]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0], -1)  # oracle: one plain forward
    for i, (t, lp) in enumerate(zip(tokens, lps)):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == t and abs(lp.logprob - float(row[t])) < 1e-4
        assert [tid for tid, _ in lp.top] == row.topk(3).indices.tolist()


def test_outputs_do_not_depend_on_batch_size_or_neighbours():
    model = _model()
    prompts = _prompts(8, seed=4)
    for req in (SamplingParams(max_tokens=10, **GREEDY), SamplingParams(max_tokens=10, top_p=0.9, min_p=0.05, seed=7)):
        alone = [_first_tokens(LLMEngine(model).generate([p], req))[0] for p in prompts[:3]]
        for sched in (SchedulerConfig(max_num_seqs=2, max_batched_tokens=8), SchedulerConfig(max_num_seqs=8)):
            crowd = _first_tokens(LLMEngine(model, EngineConfig(scheduler=sched)).generate(prompts, req))
            assert crowd[:3] == alone


def penalised_by_definition(logits: list[float], prompt: list[int], output: list[int], repetition: float,
                            presence: float, frequency: float) -> list[float]:
    """The penalties written out token by token: repetition (CTRL, HF) on every token seen in the
    prompt or the output, presence and frequency (OpenAI) on generated tokens only."""
    out = []
    for token, x in enumerate(logits):
        if token in prompt or token in output:
            x = x / repetition if x > 0 else x * repetition
        count = output.count(token)
        out.append(x - frequency * count - (presence if count else 0.0))
    return out


def test_penalised_greedy_generation_matches_the_oracle():
    model = _model()
    prompt = _prompts(1, seed=6)[0]
    params = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.8,
                            frequency_penalty=0.5)
    got = _first_tokens(LLMEngine(model).generate([prompt], params))[0]
    out = []
    with torch.no_grad():
        for _ in range(12):  # oracle: full forward each token, penalties by definition, argmax by hand
            logits = model(torch.tensor([prompt + out])).logits[0, -1].tolist()
            scores = penalised_by_definition(logits, prompt, out, 1.3, 0.8, 0.5)
            out.append(max(range(len(scores)), key=scores.__getitem__))
    assert got == out


def test_stop_strings_cut_the_text_and_streaming_adds_up(tmp_path):
    from moegpt import LLM
    model, tok = _engine_with_tokenizer(tmp_path)
    llm = LLM(model=tmp_path)
    params = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    plain = llm.generate(["to be"], params)[0].outputs[0]
    assert len(plain.text) > 6
    stop = plain.text[3:6]
    cut = llm.generate(["to be"], SamplingParams(max_tokens=24, ignore_eos=True, stop=stop, **GREEDY))[0].outputs[0]
    assert cut.text == plain.text[:plain.text.index(stop)] and cut.finish_reason == "stop"
    assert list(cut.token_ids) == list(plain.token_ids[:len(cut.token_ids)])
    engine = LLMEngine(model, tokenizer=tok)
    streamed = "".join(u.text for u in engine.stream(tok.encode("to be", add_special_tokens=True), params))
    assert streamed == plain.text


def test_every_block_is_free_after_finished_aborted_and_preempted_requests():
    model = _model()
    cfg = EngineConfig(block_size=4, kv_cache_bytes=kv_cache_bytes_per_token(model.cfg, FP32_KV_BYTES) * 4 * 10,
                       scheduler=SchedulerConfig(max_num_seqs=4, max_batched_tokens=16))
    engine = LLMEngine(model, cfg)
    rids = [engine.add_request(p, SamplingParams(max_tokens=10, **GREEDY)) for p in _prompts(8, seed=8)]
    preempted, steps = 0, 0
    while engine.has_work:
        engine.step()
        steps += 1
        if steps in (2, 5):
            engine.abort(rids[steps])  # one running, one waiting or running
    assert engine.stats.preemptions > 0 and engine.stats.aborted == 2
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.stats.running == engine.stats.waiting == 0


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([], {}, "the prompt is empty"),
    ([5] * 510, dict(max_tokens=10), r"prompt \(510 tokens\) \+ max_tokens \(10\) exceeds the context \(512\)"),
    ([300], {}, "prompt token id 300 is outside the vocabulary"),
    ([5], dict(stop=("x",)), "stop strings need an engine with a tokenizer"),
])
def test_bad_requests_are_refused_before_any_work(prompt, kwargs, message):
    engine = LLMEngine(_model())
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**kwargs))
    assert not engine.has_work and engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n=0 must be >= 1"), (dict(max_tokens=0), "max_tokens=0"), (dict(logprobs=21), "logprobs=21"),
    (dict(stop=("",)), "stop strings must be non-empty"), (dict(stop_token_ids=[-1]), r"stop_token_ids=\[-1\]"),
])
def test_bad_request_values_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_kv_budget_in_blocks_and_a_draft_with_another_tokenizer_is_refused(tmp_path):
    from moegpt import LLM
    from moegpt.checkpoint.model_dir import save
    from moegpt.data.tokenizer import Tokenizer

    engine = LLMEngine(_model(), EngineConfig(block_size=8, num_kv_blocks=5))
    assert engine.blocks.num_blocks == 5 and engine.cache.k[0].shape[0] == 40
    _engine_with_tokenizer(tmp_path / "target")
    other = Tokenizer.train(["a completely different corpus of words\n" * 50], vocab_size=300)
    save(build_model(preset("tiny").replace(vocab_size=300, n_layers=1), seed=1), other, tmp_path / "draft")
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        LLM(model=tmp_path / "target", draft_model=tmp_path / "draft")


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_a_context_extended_model_serves_past_its_original_context_with_prefix_caching(kind):
    """A model extended 16 -> 128 tokens: the engine admits prompts past 16 (max_model_len is the
    config's), its greedy tokens are plain generation's, and prefix-cache hits change nothing."""
    from moegpt.config import RopeScaling

    scaling = RopeScaling(type=kind, factor=8.0, original_max_seq_len=16)
    model = _model()
    extended = build_model(model.cfg.replace(max_seq_len=128, rope_scaling=scaling), seed=2)
    extended.load_state_dict(model.state_dict())
    extended.eval()
    shared = _prompts(1, seed=5)[0] * 3
    prompts = [shared + [7] * 20, shared + [9, 11] * 15, shared + [7] * 20]
    assert min(len(p) for p in prompts) > 16
    params = SamplingParams(max_tokens=8, **GREEDY)
    engine = LLMEngine(extended, EngineConfig(block_size=4))
    assert engine.max_len == 128
    hits, lookup = [], engine.blocks._cached_prefix

    def counted(seq):
        found = lookup(seq)
        hits.append(len(found[0]))
        return found

    engine.blocks._cached_prefix = counted
    got = _one_at_a_time(engine, prompts, params)  # the third finds the first's blocks cached
    assert hits[2] * 4 > 16  # cached blocks past the original context
    for prompt, out in zip(prompts, got):
        assert out == generate(extended, torch.tensor([prompt]), 8)[0, len(prompt):].tolist()
    assert got[0] == got[2]
    plain = _first_tokens(LLMEngine(model.eval(), EngineConfig(block_size=4)).generate(prompts[:1], params))
    assert plain[0] != got[0]  # the scaling is in effect (plain RoPE goes elsewhere)
