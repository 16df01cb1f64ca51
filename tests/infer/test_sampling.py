"""Sampling: greedy, temperature, top-k and top-p change the distribution as documented."""

import pytest
import torch

from moegpt.infer.sampling import filtered_probs, sample
from moegpt.infer.sampling_params import SamplingParams


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [1, 0]


def test_top_k_keeps_only_the_k_most_likely():
    probs = filtered_probs(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), SamplingParams(top_k=2))
    assert probs[0, 0] == 0 and probs[0, 3] == 0
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filtered_probs(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert probs[0].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])


def test_same_seed_same_samples_and_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20_000, 3)
    a = sample(logits, SamplingParams(), torch.Generator().manual_seed(3))
    b = sample(logits, SamplingParams(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / a.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature=-1"), (dict(top_k=-2), "top_k=-2"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=0.0), "top_p=0.0"),
])
def test_bad_sampling_params_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filtered_probs(logits, SamplingParams(min_p=0.25))  # threshold 0.125: drops 0.05
    assert probs[0].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])


def test_penalties_follow_their_definitions():
    from moegpt.infer.sampling import apply_penalties

    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[1], output_ids=[0])
    assert rep.tolist() == [1.0, -2.0, 0.5, 0.0]  # seen: positive halves, negative doubles
    pf = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                         prompt_ids=[2], output_ids=[0, 0, 3])  # the prompt is not penalised
    assert pf.tolist() == pytest.approx([2.0 - 0.5 - 0.5, -1.0, 0.5, 0.0 - 0.5 - 0.25])


def test_top_logprobs_are_the_models_log_softmax():
    from moegpt.infer.sampling import top_logprobs

    logits = torch.tensor([1.0, 3.0, 2.0])
    lp = top_logprobs(logits, chosen=0, n=2)
    logp = torch.log_softmax(logits, -1)
    assert lp.token_id == 0 and lp.logprob == pytest.approx(float(logp[0])) and lp.rank == 3
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(float(logp[1]))


def test_vllm_spellings_mean_what_they_mean_in_vllm():
    assert SamplingParams(top_k=-1).top_k is None and SamplingParams(top_k=0).top_k is None  # no top-k
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(stop=["x", "y"]).stop == ("x", "y")
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7) and SamplingParams().stop == ()
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    plain = filtered_probs(logits, SamplingParams())
    assert torch.equal(filtered_probs(logits, SamplingParams(top_k=-1, top_p=1.0, min_p=0.0)), plain)
    assert torch.allclose(plain, torch.softmax(logits, -1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=1.5), "min_p=1.5"), (dict(repetition_penalty=0), "repetition_penalty=0"),
    (dict(presence_penalty=3), "presence_penalty=3"), (dict(frequency_penalty=-2.5), "frequency_penalty=-2.5"),
])
def test_bad_penalty_and_min_p_values_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
