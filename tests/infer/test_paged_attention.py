"""The runner's fast paths against their obvious versions: both paged attention paths (batched
decode, and one call per sequence) against attention written out by definition, vectorised slot
metadata against per-chunk slot lists, logits of the asked-for rows against the full forward's."""

import dataclasses

import pytest
import torch

from moegpt.config import preset
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.infer.runner import Chunk, ModelRunner, attention_metadata
from moegpt.model import build_model

BS = 4  # block size


def _cfg():
    return preset("tiny").replace(vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=32, n_experts=4)


def slots_of(block_table: tuple[int, ...], start: int, end: int) -> list[int]:
    """Slots of positions [start, end) of a sequence with this block table, one position at a time."""
    return [block_table[pos // BS] * BS + pos % BS for pos in range(start, end)]


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


def attention_by_definition(k_slots, v_slots, chunks, q, k, v):
    """The obvious paged attention, one query and one head at a time in float64: write the new keys
    and values into their slots (slot = block_table[pos // BS] * BS + pos % BS), then each query at
    position p takes softmax(q . k_t / sqrt(Dh)) over its sequence's keys t = 0..p. Shares no code
    with the runner's metadata or either attention path. -> (1, H, N, Dh)."""
    K, V = k_slots.double().clone(), v_slots.double().clone()  # (slots, G, Dh)
    H, G, Dh = q.shape[1], K.shape[1], q.shape[3]

    def slot(c, pos):
        return c.block_table[pos // BS] * BS + pos % BS

    flat = 0
    for c in chunks:
        for j in range(len(c.tokens)):
            K[slot(c, c.start + j)], V[slot(c, c.start + j)] = k[0, :, flat + j].double(), v[0, :, flat + j].double()
        flat += len(c.tokens)
    out = torch.zeros(1, H, q.shape[2], Dh, dtype=torch.float64)
    flat = 0
    for c in chunks:
        for j in range(len(c.tokens)):
            p = c.start + j
            keys = torch.stack([K[slot(c, t)] for t in range(p + 1)])  # (p+1, G, Dh)
            values = torch.stack([V[slot(c, t)] for t in range(p + 1)])
            for h in range(H):
                g = h // (H // G)  # the kv head this query head shares
                scores = keys[:, g] @ q[0, h, flat + j].double() / Dh ** 0.5  # (p+1,)
                out[0, h, flat + j] = torch.softmax(scores, 0) @ values[:, g]
        flat += len(c.tokens)
    return out


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_attention_paths_match_attention_by_definition(step, dtype):
    cfg = _cfg()
    chunks = _chunks(STEPS[step])
    meta, positions = attention_metadata(chunks, BS)
    g = torch.Generator().manual_seed(1)
    N, H, G, Dh = positions.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(1, H, N, Dh, generator=g).to(dtype)
    k, v = torch.randn(1, G, N, Dh, generator=g).to(dtype), torch.randn(1, G, N, Dh, generator=g).to(dtype)
    results = []
    for m in (meta, dataclasses.replace(meta, decode=None)):  # batched decode, then one call per sequence
        cache = PagedKVCache(cfg, 64, BS, dtype)
        torch.manual_seed(2)
        for t in cache.k + cache.v:
            t.copy_(torch.randn(t.shape))  # earlier tokens' keys/values
        before = cache.k[0].clone(), cache.v[0].clone()
        results.append(cache.views(m)[0].attend(q, k, v, positions))
    assert (meta.decode is not None) == any(kind[0] == "decode" for kind in STEPS[step])
    expected = attention_by_definition(*before, chunks, q, k, v)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got in results:
        torch.testing.assert_close(got.double(), expected, **tol)


def test_slot_metadata_matches_each_chunks_slots():
    chunks = _chunks(STEPS["mixed"])
    meta, positions = attention_metadata(chunks, BS)
    expected_mapping, expected_positions = [], []
    for i, c in enumerate(chunks):
        end = c.start + len(c.tokens)
        expected_mapping += slots_of(c.block_table, c.start, end)
        expected_positions += list(range(c.start, end))
        assert meta.context_slots[i, :end].tolist() == slots_of(c.block_table, 0, end)
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
    # (short chunks run the decode program: in bf16 its roundings come in another order)
    tol = {} if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out.logits, full[-2:], **tol)
    assert out.expert_counts.shape == (model.cfg.n_layers, model.cfg.n_experts)
    assert out.expert_counts.sum().item() == model.cfg.n_layers * 10 * model.cfg.top_k
