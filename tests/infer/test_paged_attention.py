"""The runner's fast paths against their obvious versions: batched decode attention against one
attention call per sequence, vectorised slot metadata against per-chunk slot lists, logits of the
asked-for rows against the full forward's."""

import dataclasses

import pytest
import torch

from moegpt.config import preset
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.infer.runner import Chunk, ModelRunner, attention_metadata, slots_of
from moegpt.model import build_model

BS = 4  # block size


def _cfg():
    return preset("tiny").replace(vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=32, n_experts=4)


def _chunks(kinds):
    """One chunk per kind: ('decode', context) or ('prefill', start, n); distinct shuffled blocks."""
    g = torch.Generator().manual_seed(0)
    free = torch.randperm(64, generator=g).tolist()
    chunks = []
    for kind in kinds:
        start, n = (kind[1] - 1, 1) if kind[0] == "decode" else kind[1:]
        table = tuple(free.pop() for _ in range(-(-(start + n) // BS)))
        chunks.append(Chunk(tokens=tuple(range(n)), start=start, block_table=table,
                            num_logits=1 if kind[0] == "decode" else n))
    return chunks


STEPS = {
    "decode, unequal lengths": [("decode", 9), ("decode", 3), ("decode", 17), ("decode", 1)],
    "decode, equal lengths": [("decode", 6), ("decode", 6)],
    "mixed": [("decode", 9), ("prefill", 0, 7), ("decode", 14), ("prefill", 8, 3), ("decode", 2)],
    "prefill only": [("prefill", 0, 5), ("prefill", 4, 6)],
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_attention_matches_one_call_per_sequence(step, dtype):
    cfg = _cfg()
    chunks = _chunks(STEPS[step])
    meta, positions = attention_metadata(chunks, BS)
    g = torch.Generator().manual_seed(1)
    N, H, G, Dh = positions.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(1, H, N, Dh, generator=g).to(dtype)
    k, v = torch.randn(1, G, N, Dh, generator=g).to(dtype), torch.randn(1, G, N, Dh, generator=g).to(dtype)
    results = []
    for m in (meta, dataclasses.replace(meta, decode=None)):  # fast, then every sequence through the loop
        cache = PagedKVCache(cfg, 64, BS, dtype)
        torch.manual_seed(2)
        for t in cache.k + cache.v:
            t.copy_(torch.randn(t.shape))  # earlier tokens' keys/values
        results.append(cache.views(m)[0].attend(q, k, v, positions))
    assert (meta.decode is not None) == any(kind[0] == "decode" for kind in STEPS[step])
    torch.testing.assert_close(results[0], results[1])


def test_slot_metadata_matches_each_chunks_slots():
    chunks = _chunks(STEPS["mixed"])
    meta, positions = attention_metadata(chunks, BS)
    expected_mapping, expected_positions = [], []
    for i, c in enumerate(chunks):
        end = c.start + len(c.tokens)
        expected_mapping += slots_of(c.block_table, BS, c.start, end).tolist()
        expected_positions += list(range(c.start, end))
        assert meta.context_slots[i, :end].tolist() == slots_of(c.block_table, BS, 0, end).tolist()
        assert meta.context_lens[i] == end
    assert meta.slot_mapping.tolist() == expected_mapping
    assert positions.tolist() == expected_positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_logits_are_the_full_forwards_rows(dtype):
    model = build_model(_cfg(), seed=3, dtype=dtype).eval()
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6]]
    runner = ModelRunner(model, PagedKVCache(model.cfg, 16, BS, dtype))
    chunks = [Chunk(tokens=tuple(prompts[0]), start=0, block_table=(0, 1), num_logits=2),
              Chunk(tokens=tuple(prompts[1]), start=0, block_table=(2,), num_logits=0)]
    out = runner.run(chunks)
    assert out.logits.shape == (2, model.cfg.vocab_size)
    with torch.no_grad():
        full = model(torch.tensor([prompts[0]])).logits[0]  # (T, V)
    torch.testing.assert_close(out.logits, full[-2:])
    assert out.expert_counts.shape == (model.cfg.n_layers, model.cfg.n_experts)
    assert out.expert_counts.sum().item() == model.cfg.n_layers * 10 * model.cfg.top_k
