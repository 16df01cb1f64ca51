"""The offline API in vLLM's shape: a vLLM offline-generation script runs by changing its import,
prompts as text or token ids, one SamplingParams or one per prompt, vLLM's result types, and
LLMEngine.generate beside other requests."""

import pytest
import torch

from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.engine import LLMEngine
from moegpt.infer.generate import generate
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model

VLLM_SCRIPT = '''
from vllm import LLM, SamplingParams

prompts = ["to be", "that is the", "question"]
sampling_params = SamplingParams(n=2, temperature=0.8, top_p=0.95, top_k=-1, min_p=0.0, seed=0, stop=["\\n\\n"],
                                 stop_token_ids=[], ignore_eos=False, max_tokens=8, logprobs=2,
                                 presence_penalty=0.1, frequency_penalty=0.1, repetition_penalty=1.1)
llm = LLM(model=MODEL_DIR)
outputs = llm.generate(prompts, sampling_params)
results = []
for output in outputs:
    for completion in output.outputs:
        chosen = [lps[t].logprob for t, lps in zip(completion.token_ids, completion.logprobs)]
        results.append((output.prompt, list(output.prompt_token_ids), completion.index, completion.text,
                        list(completion.token_ids), completion.finish_reason, chosen, completion.cumulative_logprob))
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    model = build_model(preset("tiny").replace(vocab_size=300, n_layers=1), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper logits: greedy paths that differ per prompt
    save(model, tok, path)
    return path


def _run_vllm_script(model_dir) -> list:
    namespace = {"MODEL_DIR": str(model_dir)}
    exec(VLLM_SCRIPT.replace("from vllm import", "from moegpt import"), namespace)  # the only change
    return namespace["results"]


def test_a_vllm_offline_script_runs_by_changing_the_import(model_dir):
    from moegpt.checkpoint.model_dir import load

    results = _run_vllm_script(model_dir)
    assert results == _run_vllm_script(model_dir)  # seeded: the same completions again
    _, tok = load(model_dir)
    assert [(r[0], r[2]) for r in results] == [(p, i) for p in ("to be", "that is the", "question") for i in (0, 1)]
    for prompt, prompt_ids, _, text, token_ids, finish, chosen, cumulative in results:
        assert prompt_ids == tok.encode(prompt, add_special_tokens=True)
        assert 1 <= len(token_ids) <= 8 and finish in ("stop", "length")
        assert finish == "stop" or len(token_ids) == 8
        assert text == tok.decode(token_ids) or finish == "stop"
        assert len(chosen) == len(token_ids) and cumulative == pytest.approx(sum(chosen))
    assert any(r[4] != s[4] for r, s in zip(results[::2], results[1::2]))  # n=2: the completions differ


def test_prompts_as_text_or_token_ids_with_one_params_per_prompt(model_dir):
    from moegpt import LLM, CompletionOutput, RequestOutput

    llm = LLM(model=model_dir)
    ids = llm.tokenizer.encode("to be", add_special_tokens=True)
    greedy3, greedy5 = SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0, max_tokens=5)
    outs = llm.generate(["to be", ids, {"prompt_token_ids": ids}, {"prompt": "to be"}], [greedy5, greedy5, greedy3, greedy5])
    assert all(isinstance(o, RequestOutput) and isinstance(o.outputs[0], CompletionOutput) for o in outs)
    assert [o.prompt for o in outs] == ["to be", None, None, "to be"]
    assert all(o.prompt_token_ids == tuple(ids) and o.finished for o in outs)
    model = llm.engine.model
    expected = generate(model, torch.tensor([ids]), 5, eos_id=llm.tokenizer.eos_id)[0, len(ids):].tolist()
    assert list(outs[0].outputs[0].token_ids) == list(outs[1].outputs[0].token_ids) == expected
    assert list(outs[2].outputs[0].token_ids) == expected[:3]
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 4
    single = llm.generate("to be", greedy5)  # one prompt, not in a list
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["to be"], [greedy3, greedy5])


def test_logprobs_are_vllm_dicts_of_the_chosen_and_most_likely_tokens(model_dir):
    from moegpt import LLM

    llm = LLM(model=model_dir)
    c = llm.generate(["to be"], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    for token, lps in zip(c.token_ids, c.logprobs):
        best = max(lps.values(), key=lambda lp: lp.logprob)
        assert lps[token].rank == 1 and lps[token] == best  # greedy: the chosen token is the most likely
        assert sorted(lp.rank for lp in lps.values()) == [1, 2, 3]
        assert lps[token].decoded_token == llm.tokenizer.decode([token])
    assert c.cumulative_logprob == pytest.approx(sum(lps[t].logprob for t, lps in zip(c.token_ids, c.logprobs)))
    plain = llm.generate(["to be"], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_engine_generate_runs_beside_requests_already_in_the_engine():
    cfg = preset("tiny").replace(vocab_size=256, n_layers=2, d_model=64, n_heads=4, d_ff=64, n_experts=8)
    model = build_model(cfg, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    background, prompt = [5, 9, 33, 7], [40, 41, 42]
    alone = {tuple(p): list(LLMEngine(model).generate([p], greedy)[0].outputs[0].token_ids)
             for p in (background, prompt)}
    engine = LLMEngine(model)
    rid = engine.add_request(background, greedy)
    tokens = [t for u in engine.step() for t in u.new_token_ids]  # the other request is running
    out = engine.generate([prompt], greedy)  # raised KeyError on the other request's updates before
    assert list(out[0].outputs[0].token_ids) == alone[tuple(prompt)]
    while engine.has_work:  # the other request's updates made during generate() come with the next step
        for u in engine.step():
            assert u.request_id == rid
            tokens.extend(u.new_token_ids)
    assert tokens == alone[tuple(background)]


def test_sampling_params_of_the_wrong_type_are_one_line_errors_naming_the_field():
    for kwargs, named in [(dict(n=1.5), "n=1.5"), (dict(top_k=2.5), "top_k=2.5"), (dict(max_tokens=2.5), "max_tokens"),
                          (dict(seed="x"), "seed='x'"), (dict(logprobs=True), "logprobs=True"),
                          (dict(temperature="hot"), "temperature='hot'"), (dict(top_p=float("nan")), "top_p=nan")]:
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            SamplingParams(**kwargs)
    assert SamplingParams(max_tokens=None).max_tokens is None  # vLLM: up to the context


def test_an_interrupted_generate_leaves_nothing_in_the_engine(model_dir):
    from moegpt import LLM

    llm = LLM(model=model_dir)
    engine = llm.engine
    calls = 0

    def fail_on_second_output(output):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts, [SamplingParams(max_tokens=2, temperature=0), SamplingParams(max_tokens=4, temperature=0),
                                  SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)],
                        on_output=fail_on_second_output)
    assert not engine.has_work and not engine.live and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    stream = engine.stream([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()  # a client that stops reading
    assert not engine.has_work and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    out = llm.generate(["to be"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=True)
    assert len(out[0].outputs[0].token_ids) == 3  # the engine still works


def test_the_llm_seed_makes_unseeded_requests_repeat(model_dir):
    from moegpt import LLM

    params = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in LLM(model=model_dir, seed=3).generate(["to be", "to be"], params)]
    again = [o.outputs[0].token_ids for o in LLM(model=model_dir, seed=3).generate(["to be", "to be"], params)]
    assert first == again and first[0] != first[1]  # per request: seed + i
    assert LLM(model=model_dir).get_tokenizer() is not None
