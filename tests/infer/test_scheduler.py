"""Block manager and scheduler, driven by a fake model whose next token is a function of the
sequence so far (so any schedule must give the same outputs)."""

import random

import pytest

from moegpt.infer.block_manager import BlockManager
from moegpt.infer.scheduler import Scheduler, SchedulerConfig
from moegpt.infer.sequence import FinishReason, Sequence, Status


def fake_next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 50 + 3  # never 0..2 (stop ids in some tests)


def run(scheduler: Scheduler, stop_ids=None, abort_at: dict[int, int] | None = None, check=None):
    """Drive the scheduler to completion; returns {seq_id: output_ids}."""
    outputs, step = {}, 0
    while scheduler.has_work:
        batch = scheduler.schedule()
        if check is not None:
            check(batch, scheduler)
        sampled = {e.seq.seq_id: [fake_next_token(e.seq.token_ids)] for e in batch.entries if e.samples_next_token}
        for seq in scheduler.update(batch, sampled, stop_ids or {}):
            outputs[seq.seq_id] = list(seq.output_ids)
        step += 1
        for seq_id, at in (abort_at or {}).items():
            if at == step:
                aborted = scheduler.abort(seq_id)
                if aborted is not None:
                    outputs[seq_id] = list(aborted.output_ids)
        assert step < 10_000
    return outputs


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(fake_next_token(tokens))
        tokens.append(out[-1])
    return out


def make_seqs(n, seed=0, prompt_len=(1, 40), max_tokens=(1, 20)):
    rng = random.Random(seed)
    return [Sequence(seq_id=i, prompt_ids=[rng.randrange(3, 50) for _ in range(rng.randint(*prompt_len))],
                     max_tokens=rng.randint(*max_tokens))
            for i in range(n)]


def test_every_request_gets_its_exact_tokens_under_step_limits():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=5, max_batched_tokens=16), blocks)
    seqs = make_seqs(20)
    for s in seqs:
        sched.add(s)

    def check(batch, scheduler):
        assert len(batch.entries) <= 5 and batch.num_tokens <= 16

    outputs = run(sched, check=check)
    for s in seqs:
        assert outputs[s.seq_id] == expected_output(s.prompt_ids, s.max_tokens)
        assert s.finish_reason == FinishReason.LENGTH
    assert blocks.num_free_blocks == 64


def test_long_prompt_is_prefilled_in_chunks_beside_running_decodes():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_batched_tokens=8), blocks)
    short = Sequence(seq_id=0, prompt_ids=[5, 6], max_tokens=30)
    sched.add(short)
    first = sched.schedule()  # the short prompt's prefill
    sched.update(first, {0: [fake_next_token(short.token_ids)]}, {})
    long = Sequence(seq_id=1, prompt_ids=list(range(3, 43)), max_tokens=2)
    sched.add(long)
    chunks = []
    while long.num_computed < 40:
        b = sched.schedule()
        by_id = {e.seq.seq_id: e for e in b.entries}
        assert 0 in by_id and by_id[0].num_tokens == 1  # the decode runs every step
        chunks.append(by_id[1].num_tokens)
        sampled = {e.seq.seq_id: [fake_next_token(e.seq.token_ids)] for e in b.entries if e.samples_next_token}
        sched.update(b, sampled, {})
    assert sum(chunks) == 40 and max(chunks) <= 7 and len(chunks) >= 6


def test_preempted_requests_finish_with_the_tokens_they_would_have_produced():
    blocks = BlockManager(num_blocks=12, block_size=4)  # too few for all at once: forces preemption
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=32), blocks)
    seqs = make_seqs(10, seed=3, prompt_len=(4, 16), max_tokens=(8, 24))
    for s in seqs:
        sched.add(s)
    preempted = []
    outputs = run(sched, check=lambda b, s: preempted.extend(b.preempted))
    assert preempted, "the test must exercise preemption"
    for s in seqs:
        assert outputs[s.seq_id] == expected_output(s.prompt_ids, s.max_tokens)
    assert blocks.num_free_blocks == 12


def test_all_blocks_free_after_a_mix_of_finished_aborted_and_preempted():
    blocks = BlockManager(num_blocks=16, block_size=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_batched_tokens=12), blocks)
    seqs = make_seqs(15, seed=7, prompt_len=(2, 10), max_tokens=(3, 12))
    for s in seqs:
        sched.add(s)
    run(sched, stop_ids={s.seq_id: frozenset({3, 4}) for s in seqs}, abort_at={2: 3, 9: 1, 11: 6})
    reasons = {s.finish_reason for s in seqs}
    assert FinishReason.ABORT in reasons and all(s.is_finished for s in seqs)
    assert blocks.num_free_blocks == 16 and all(c == 0 for c in blocks.ref_count)


def test_shared_prompt_prefix_reuses_cached_blocks_with_same_outputs():
    prefix = list(range(3, 23))  # 20 tokens = 5 full blocks of 4
    blocks = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_batched_tokens=64), blocks)
    first = Sequence(seq_id=0, prompt_ids=prefix + [40, 41], max_tokens=3)
    second = Sequence(seq_id=1, prompt_ids=prefix + [42], max_tokens=3)
    sched.add(first)
    run(sched)
    sched.add(second)
    batch = sched.schedule()
    assert batch.entries[0].start == 20  # the 5 prefix blocks came from the cache
    sched.update(batch, {1: [fake_next_token(second.token_ids)]}, {})
    run(sched)
    assert second.output_ids == expected_output(second.prompt_ids, 3)
    assert blocks.num_free_blocks == 32


def test_concurrent_sequences_share_prefix_blocks_by_reference_count():
    prefix = list(range(3, 11))  # 2 full blocks of 4
    blocks = BlockManager(num_blocks=16, block_size=4)
    a = Sequence(seq_id=0, prompt_ids=prefix + [30], max_tokens=2)
    b = Sequence(seq_id=1, prompt_ids=prefix + [31], max_tokens=2)
    blocks.admit(a)
    blocks.grow(a, a.num_uncomputed)
    a.num_computed = a.num_tokens
    blocks.register_full_blocks(a)
    blocks.admit(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    assert [blocks.ref_count[x] for x in a.block_table[:2]] == [2, 2]
    blocks.release(a)
    assert [blocks.ref_count[x] for x in b.block_table] == [1, 1]
    blocks.release(b)
    assert blocks.num_free_blocks == 16


def test_request_that_can_never_fit_is_refused_at_once():
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match=r"prompt \(10\) \+ max_tokens \(10\) needs 5 KV blocks; the cache has 4"):
        sched.add(Sequence(seq_id=0, prompt_ids=list(range(10)), max_tokens=10))


def test_bad_sequences_and_limits_name_the_value():
    with pytest.raises(ValueError, match="max_tokens=0"):
        Sequence(seq_id=0, prompt_ids=[1], max_tokens=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        Sequence(seq_id=0, prompt_ids=[], max_tokens=5)
    with pytest.raises(ValueError, match=r"max_num_seqs \(0\)"):
        SchedulerConfig(max_num_seqs=0)


def _computed(blocks: BlockManager, seq: Sequence) -> None:
    """Admit ``seq`` and mark all its tokens computed, naming its full blocks."""
    blocks.admit(seq)
    blocks.grow(seq, seq.num_uncomputed)
    seq.num_computed = seq.num_tokens
    blocks.register_full_blocks(seq)


def test_a_block_is_reused_only_when_its_tokens_and_its_prefix_match(monkeypatch):
    import moegpt.infer.block_manager as block_manager

    monkeypatch.setattr(block_manager, "chain_hash", lambda previous, tokens: b"\0" * 32)  # every name collides
    blocks = BlockManager(num_blocks=16, block_size=4)
    x, y, z = [3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]
    first = Sequence(seq_id=0, prompt_ids=x + y + [1], max_tokens=1)
    _computed(blocks, first)
    same_start = Sequence(seq_id=1, prompt_ids=x + z + [1], max_tokens=1)
    blocks.admit(same_start)
    assert same_start.block_table == first.block_table[:1]  # x verified; z's name is x's, its tokens are not
    other_start = Sequence(seq_id=2, prompt_ids=z + y + [1], max_tokens=1)
    blocks.admit(other_start)
    assert other_start.block_table == [] and other_start.num_computed == 0  # same name, other tokens: a miss


def test_a_freed_block_is_found_by_its_name_until_it_is_handed_out_again():
    blocks = BlockManager(num_blocks=3, block_size=2)
    a = Sequence(seq_id=0, prompt_ids=[3, 4, 5, 6, 1], max_tokens=1)  # blocks [3, 4] [5, 6] [1]
    _computed(blocks, a)
    blocks.release(a)  # freed tail first: [1], then [5, 6], then [3, 4] (still named)
    b = Sequence(seq_id=1, prompt_ids=[9, 9, 1], max_tokens=1)
    _computed(blocks, b)  # takes the two oldest free blocks: [1]'s and [5, 6]'s
    blocks.release(b)
    again = Sequence(seq_id=2, prompt_ids=[3, 4, 5, 6, 2], max_tokens=1)
    blocks.admit(again)
    assert again.num_computed == 2  # [3, 4] is still cached; [5, 6]'s block was handed out to b
