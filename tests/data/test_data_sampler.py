"""MixtureSampler: exact resume, per-pass epoch counts, fingerprint checks, seeding."""

from __future__ import annotations

import pytest
import torch

from moegpt.data import MixtureSampler

COUNTS = (13, 29, 5)
EPOCHS = (2.0, 1.0, 4.0)
BATCH_SIZES = [1, 3, 7, 2, 16, 5, 40, 9, 11, 4]  # ramp-up and changes, crossing pass boundaries


def draw(sampler: MixtureSampler, sizes: list[int]) -> torch.Tensor:
    return torch.cat([sampler.next_batch(n) for n in sizes])


def test_resumed_sampler_yields_same_samples_as_unbroken_run() -> None:
    unbroken = draw(MixtureSampler(COUNTS, EPOCHS, seed=7), BATCH_SIZES)
    for split in range(1, len(BATCH_SIZES)):
        first = MixtureSampler(COUNTS, EPOCHS, seed=7)
        head = draw(first, BATCH_SIZES[:split])
        resumed = MixtureSampler(COUNTS, EPOCHS, seed=7)
        resumed.load_state_dict(first.state_dict())
        tail = draw(resumed, BATCH_SIZES[split:])
        assert torch.equal(torch.cat([head, tail]), unbroken)


def test_state_dict_holds_plain_ints() -> None:
    sampler = MixtureSampler(COUNTS, EPOCHS, seed=7)
    sampler.next_batch(200)  # pass length is 75: lands in pass 2
    state = sampler.state_dict()
    assert all(type(v) is int for v in state.values())
    assert (state["pass_index"], state["position"]) == (2, 50)


def test_consuming_n1_then_n2_equals_consuming_n1_plus_n2() -> None:
    a = MixtureSampler(COUNTS, EPOCHS, seed=1)
    b = MixtureSampler(COUNTS, EPOCHS, seed=1)
    assert torch.equal(torch.cat([a.next_batch(30), a.next_batch(70)]), b.next_batch(100))


def test_each_pass_draws_every_block_exactly_epochs_times() -> None:
    sampler = MixtureSampler(COUNTS, EPOCHS, seed=0)
    assert sampler.pass_length == 13 * 2 + 29 + 5 * 4
    for _ in range(3):
        samples = sampler.next_batch(sampler.pass_length)
        for source, (n_blocks, epochs) in enumerate(zip(COUNTS, EPOCHS)):
            blocks = samples[samples[:, 0] == source, 1]
            assert torch.equal(torch.bincount(blocks, minlength=n_blocks), torch.full((n_blocks,), int(epochs)))


def test_fractional_epochs_draw_rounded_share_without_repeats_in_partial_epoch() -> None:
    sampler = MixtureSampler((10, 8), (0.5, 1.25), seed=0)
    samples = sampler.next_batch(sampler.pass_length)
    first = samples[samples[:, 0] == 0, 1]
    second = samples[samples[:, 0] == 1, 1]
    assert len(first) == 5 and len(set(first.tolist())) == 5
    assert len(second) == 10
    assert torch.bincount(second, minlength=8).tolist().count(2) == 2  # 8 once + 2 from a fresh permutation


def test_sources_are_interleaved_not_concatenated() -> None:
    samples = MixtureSampler((100, 100), (1.0, 1.0), seed=0).next_batch(200)
    assert 0 < samples[:100, 0].sum().item() < 100


def test_new_pass_uses_a_new_order() -> None:
    sampler = MixtureSampler(COUNTS, EPOCHS, seed=0)
    first_pass = sampler.next_batch(sampler.pass_length)
    assert not torch.equal(sampler.next_batch(sampler.pass_length), first_pass)


def test_same_seed_is_deterministic_and_different_seeds_differ() -> None:
    a = draw(MixtureSampler(COUNTS, EPOCHS, seed=5), BATCH_SIZES)
    b = draw(MixtureSampler(COUNTS, EPOCHS, seed=5), BATCH_SIZES)
    c = draw(MixtureSampler(COUNTS, EPOCHS, seed=6), BATCH_SIZES)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampler_ignores_global_rng() -> None:
    torch.manual_seed(0)
    a = MixtureSampler(COUNTS, EPOCHS, seed=5).next_batch(50)
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(MixtureSampler(COUNTS, EPOCHS, seed=5).next_batch(50), a)


@pytest.mark.parametrize(
    ("counts", "epochs", "seed"),
    [((13, 29, 6), EPOCHS, 7), (COUNTS, (2.0, 1.0, 3.0), 7), (COUNTS, EPOCHS, 8)],
)
def test_loading_state_from_a_different_mixture_is_rejected(
    counts: tuple[int, ...], epochs: tuple[float, ...], seed: int
) -> None:
    state = MixtureSampler(COUNTS, EPOCHS, seed=7).state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        MixtureSampler(counts, epochs, seed).load_state_dict(state)


def test_bad_batch_size_and_empty_sources_are_rejected() -> None:
    with pytest.raises(ValueError, match="batch size 0"):
        MixtureSampler(COUNTS, EPOCHS, seed=0).next_batch(0)
    with pytest.raises(ValueError, match="block count 0"):
        MixtureSampler((3, 0), (1.0, 1.0), seed=0)
