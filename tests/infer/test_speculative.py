"""Speculative decoding: verification keeps the target's distribution exactly (chi-square tests,
one of which shows the test catches a verifier without the correction step), and greedy
speculative output equals greedy plain output token for token."""

import pytest
import torch

from moegpt.config import preset
from moegpt.counts import kv_cache_bytes_per_token
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.speculative import SpeculativeConfig, SpeculativeMethod
from moegpt.infer.generate import generate
from moegpt.infer.sampling import filtered_probs, sample_from
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import SchedulerConfig
from moegpt.infer.speculative import NgramProposer, Proposal, verify, verify_greedy
from moegpt.model import build_model


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed ``counts`` against ``probs`` (cells with zero probability must be empty)."""
    n = counts.sum()
    expected = probs.double() * n
    assert int(counts[expected == 0].sum()) == 0, "a token with zero probability was sampled"
    keep = expected > 0
    stat = ((counts[keep].double() - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def verify_without_correction(target_probs, proposal, generator):
    """The broken verifier: on rejection it samples from p instead of normalise(max(0, p - q))."""
    out = []
    for i, d in enumerate(proposal.tokens):
        p, q = target_probs[i], proposal.probs[i]
        if float(torch.rand((), generator=generator, dtype=torch.float64)) * float(q[d]) < float(p[d]):
            out.append(d)
            continue
        return out + [int(sample_from(p[None], generator)[0])]
    return out + [int(sample_from(target_probs[-1][None], generator)[0])]


def first_token_counts(verifier, p, q, n=6_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1], dtype=torch.long)
    for _ in range(n):
        d = int(sample_from(q[None], g)[0])
        token = verifier(torch.stack([p, p]), Proposal(tokens=(d,), probs=q[None]), g)[0]
        counts[token] += 1
    return counts


def test_verification_keeps_the_target_distribution_and_the_test_catches_a_missing_correction():
    logits_p = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    logits_q = torch.tensor([[0.0, 2.0, 0.5, 1.0, 1.0, -2.0]])
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.95)
    p, q = filtered_probs(logits_p, params)[0], filtered_probs(logits_q, params)[0]
    assert chi_square_p_value(first_token_counts(verify, p, q), p) > 1e-3
    assert chi_square_p_value(first_token_counts(verify_without_correction, p, q), p) < 1e-6


def _tiny_vocab_models():
    cfg = preset("tiny").replace(vocab_size=8, n_layers=2, d_model=32, n_heads=4, d_ff=32, n_experts=4)
    target = build_model(cfg, seed=1)
    draft = build_model(cfg.replace(n_layers=1), seed=7)
    with torch.no_grad():
        for m, scale in ((target, 20.0), (draft, 20.0)):
            m.embed.weight.mul_(scale)  # logits far from uniform, and different between the two
    return target.eval(), draft.eval()


def test_speculative_engine_samples_two_tokens_from_the_targets_joint_distribution():
    target, draft = _tiny_vocab_models()
    params = dict(temperature=1.0, top_k=6, top_p=0.9)
    prompt = [3, 5, 1]
    with torch.no_grad():  # the exact joint distribution of the next two tokens, by enumeration
        p1 = filtered_probs(target(torch.tensor([prompt])).logits[0, -1:], SamplingParams(**params))[0]  # (V,)
        nxt = torch.tensor([prompt + [t] for t in range(8)])
        p2 = filtered_probs(target(nxt).logits[:, -1], SamplingParams(**params))  # (V, V) given the first token
    joint = (p1[:, None] * p2).reshape(-1)
    engine = LLMEngine(target, EngineConfig(speculative=SpeculativeConfig(num_tokens=4),
                                            scheduler=SchedulerConfig(max_num_seqs=128, max_batched_tokens=1024)),
                       draft=draft)
    counts = torch.zeros(64, dtype=torch.long)
    for chunk in range(12):
        rids = [engine.add_request(prompt, SamplingParams(max_tokens=2, seed=chunk * 1000 + i, **params))
                for i in range(128)]
        tokens = {rid: [] for rid in rids}
        while engine.has_work:
            for u in engine.step():
                if u.request_id in tokens:
                    tokens[u.request_id].extend(u.new_token_ids)
        for t in tokens.values():
            counts[t[0] * 8 + t[1]] += 1
    assert engine.stats.spec_proposed > 0 and 0 < engine.stats.spec_acceptance_rate < 1
    assert chi_square_p_value(counts, joint) > 1e-3


def _model(vocab=256, seed=2, n_layers=2):
    cfg = preset("tiny").replace(vocab_size=vocab, n_layers=n_layers, d_model=64, n_heads=4, d_ff=64, n_experts=8)
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    return model.eval()


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        motif = torch.randint(3, 256, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        out.append(motif * 4)  # repetitive: prompt lookup finds matches
    return out


@pytest.mark.parametrize("method", ["draft", "draft-is-target", "ngram"])
def test_greedy_speculative_output_equals_greedy_plain_output(method):
    target = _model()
    prompts = _prompts(7)
    small_budget = EngineConfig(block_size=4, kv_cache_bytes=kv_cache_bytes_per_token(target.cfg, 4) * 2 * 4 * 14,
                                scheduler=SchedulerConfig(max_num_seqs=4, max_batched_tokens=24))
    if method == "ngram":
        cfg = EngineConfig(block_size=small_budget.block_size, kv_cache_bytes=small_budget.kv_cache_bytes // 2,
                           scheduler=small_budget.scheduler,
                           speculative=SpeculativeConfig(method=SpeculativeMethod.NGRAM, num_tokens=3))
        engine = LLMEngine(target, cfg)
    else:
        draft = target if method == "draft-is-target" else _model(seed=9, n_layers=1)
        engine = LLMEngine(target, small_budget, draft=draft)
    preempted, schedule = [], engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (lambda b: (preempted.extend(b.preempted), b)[1])(schedule())
    got = [list(o.outputs[0].token_ids) for o in engine.generate(prompts, SamplingParams(max_tokens=14, temperature=0))]
    for prompt, out in zip(prompts, got):
        assert out == generate(target, torch.tensor([prompt]), 14)[0, len(prompt):].tolist()
    assert engine.stats.spec_proposed > 0
    if method == "draft-is-target":
        assert engine.stats.spec_acceptance_rate == 1.0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert preempted, "the budget must force preemption"


def test_ngram_proposer_continues_the_latest_match():
    prop = NgramProposer(max_n=2).propose([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], k=3)
    assert prop.tokens == (4, 5, 1) and prop.probs is None
    assert NgramProposer().propose([1, 2, 3], k=3).tokens == ()


def test_draft_with_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"draft vocab_size \(300\) differs from the model's \(256\)"):
        LLMEngine(_model(), draft=_model(vocab=300))


def test_greedy_verification_is_verify_with_one_hot_targets():
    g = torch.Generator().manual_seed(0)
    V = 6
    for _ in range(200):
        k = int(torch.randint(1, 5, (), generator=g))
        target = torch.randint(0, V, (k + 1,), generator=g).tolist()
        drafts = tuple(t if bool(torch.rand((), generator=g) < 0.6) else int(torch.randint(0, V, (), generator=g))
                       for t in target[:k])
        one_hot = torch.nn.functional.one_hot(torch.tensor(target), V).float()  # (k+1, V)
        for probs in (None, torch.softmax(torch.randn(k, V, generator=g), -1)):  # certain or sampled drafts
            proposal = Proposal(tokens=drafts, probs=probs)
            assert verify_greedy(target, proposal) == verify(one_hot, proposal, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_quantized_target_and_draft_speculate_the_targets_own_greedy_tokens(kv_cache_dtype):
    """int4 target, int8 draft (and an 8-bit KV cache): greedy speculation gives the tokens the
    quantized target gives alone, token for token."""
    from moegpt.quant.model import quantize_model
    from moegpt.quant.scheme import QuantScheme

    target = quantize_model(_model(), QuantScheme(bits=4, group_size=32))
    draft = quantize_model(_model(seed=9, n_layers=1), QuantScheme(bits=8))
    prompts = _prompts(5)
    params = SamplingParams(max_tokens=12, temperature=0)
    plain = LLMEngine(target, EngineConfig(kv_cache_dtype=kv_cache_dtype)).generate(prompts, params)
    engine = LLMEngine(target, EngineConfig(kv_cache_dtype=kv_cache_dtype), draft=draft)
    spec = engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert engine.stats.spec_proposed > 0
