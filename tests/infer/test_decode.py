"""The decode program (infer/decode.py) against the plain model's forward, its weights as views of
the model's own parameters, and its op budget per layer."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moegpt.infer.decode as decode
import moegpt.kernels as kernels
from moegpt.config import MLPKind, RopeScaling, preset
from moegpt.infer.decode import decode_weights
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.infer.runner import Chunk, ModelRunner
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model

BS = 4  # block size
BLOCKS = 12  # per sequence

SHAPES = {
    "mqa": {},
    "gqa": dict(n_kv_heads=2),
    "dense-layers": dict(moe_every=2),
    "gelu": dict(mlp=MLPKind.GELU),
    "mha-top1": dict(n_kv_heads=4, top_k=1),
    # positions run past the original context (16): the program's rope tables are the model's
    "rope-linear": dict(rope_scaling=RopeScaling(type="linear", factor=4.0, original_max_seq_len=16)),
    "rope-yarn": dict(rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)),
}


def _model(dtype=torch.float32, **kw):
    cfg = preset("tiny").replace(**{**dict(vocab_size=200, n_layers=3, d_model=64, n_heads=4, d_ff=48, n_experts=8,
                                           max_seq_len=64), **kw})
    return build_model(cfg, seed=3, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_steps_give_the_full_forward_logits(shape, dtype):
    """Prompts of different lengths prefilled through the model, then decoded together through the
    program: every step's logits are the full forward's at that position."""
    model = _model(dtype, **SHAPES[shape])
    runner = ModelRunner(model, PagedKVCache(model.cfg, 3 * BLOCKS, BS, dtype))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (7, 1, 12)]
    tables = [tuple(range(i * BLOCKS, (i + 1) * BLOCKS)) for i in range(3)]
    runner.run([Chunk(tokens=tuple(s), start=0, block_table=t, num_logits=1) for s, t in zip(seqs, tables)])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    for _ in range(5):
        new = torch.randint(0, 200, (3,), generator=g).tolist()
        chunks = [Chunk(tokens=(t,), start=len(s), block_table=tb, num_logits=1) for s, t, tb in zip(seqs, new, tables)]
        out = runner.run(chunks)  # the decode program: every chunk is one token
        for i, (s, t) in enumerate(zip(seqs, new)):
            s.append(t)
            with torch.no_grad():
                full = model(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(out.logits[i].float(), full.float(), **tol)
        if model.cfg.n_moe_layers:
            assert out.expert_counts.shape == (model.cfg.n_moe_layers, model.cfg.n_experts)
            assert (out.expert_counts.sum(1) == 3 * model.cfg.top_k).all()  # 3 tokens, k assignments each


def test_the_programs_weights_are_the_models_parameters():
    model = _model()
    w = decode_weights(model)
    attn, experts = model.layers[0].attn, model.layers[0].ffn.experts
    assert w.layers[0].wqkv.w.untyped_storage().data_ptr() == attn.wq.weight.untyped_storage().data_ptr()
    assert w.layers[0].w_in.untyped_storage().data_ptr() == experts.w_up.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.wk.weight.mul_(2)  # an in-place change of a parameter is the program's change too
    torch.testing.assert_close(w.layers[0].wqkv.w[model.cfg.q_dim:model.cfg.q_dim + model.cfg.kv_dim], attn.wk.weight)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


# Dispatched ops per layer of one batch-1 decode step through the engine (scheduling, the program
# and sampling included; the `tiny` shape). The training model took ~130 here (340 at the small
# shape, with its per-expert loop). With the C++ kernels each layer is one op (decode_layer) and the
# step's other ops (embedding, final norm, head, sampling) come to ~3 per layer: 4.25 in all; the
# issue's budget is 8. In PyTorch ops alone the program takes OPS_IN_PYTORCH (the target is 40).
OPS_WITH_KERNELS = 8
OPS_IN_PYTORCH = 61


def _decode_step_ops(monkeypatch, kernels: bool) -> collections.Counter:
    if not kernels:
        for name in ("kernel_layers_apply", "gemv_applies"):
            monkeypatch.setattr(decode, name, lambda *a: False)
    cfg = preset("tiny")
    engine = LLMEngine(build_model(cfg, seed=0), EngineConfig(kv_cache_bytes=16 * 2**20))
    engine.add_request(list(range(20)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()  # the prefill
    engine.step()
    with OpCounter() as counter:
        engine.step()  # a decode step: scheduling, the program, sampling
    return counter.ops


def test_a_batch_1_decode_step_with_the_kernels_stays_within_its_op_budget(monkeypatch):
    assert kernels.available()
    ops = _decode_step_ops(monkeypatch, kernels=True)
    n_layers = preset("tiny").n_layers
    assert sum(ops.values()) / n_layers <= OPS_WITH_KERNELS, ops.most_common(12)
    assert ops["moegpt.decode_layer.default"] == n_layers, ops


def test_a_batch_1_decode_step_in_pytorch_stays_within_its_op_budget(monkeypatch):
    ops = _decode_step_ops(monkeypatch, kernels=False)
    cfg = preset("tiny")
    assert sum(ops.values()) / cfg.n_layers <= OPS_IN_PYTORCH, ops.most_common(12)
    # the chosen experts only: two grouped products over the assignments per MoE layer, never one per expert
    assert ops["aten._grouped_mm.default"] == 2 * cfg.n_moe_layers, ops


@pytest.mark.parametrize("kernels", [True, False])
def test_a_decode_step_reads_only_the_chosen_experts_weights(monkeypatch, kernels):
    """Every expert no token chose is overwritten with NaN: the step's logits do not change, so those
    bytes were never read (one NaN read would make every logit NaN)."""
    if not kernels:
        for name in ("kernel_layers_apply", "gemv_applies"):
            monkeypatch.setattr(decode, name, lambda *a: False)
    model = _model()
    runner = ModelRunner(model, PagedKVCache(model.cfg, BLOCKS, BS))
    table = tuple(range(BLOCKS))
    runner.run([Chunk(tokens=tuple(range(5, 5 + 3 * BS)), start=0, block_table=table, num_logits=1)])
    step = [Chunk(tokens=(42,), start=3 * BS, block_table=table, num_logits=1)]
    out = runner.run(step)
    moe_layers = [b.ffn for b in model.layers if hasattr(b.ffn, "router")]
    with torch.no_grad():
        for ffn, counts in zip(moe_layers, out.expert_counts):
            unchosen = (counts == 0).nonzero()[:, 0]
            assert len(unchosen) == model.cfg.n_experts - model.cfg.top_k
            for w in (ffn.experts.w_gate, ffn.experts.w_up, ffn.experts.w_down):
                w[unchosen] = float("nan")
    again = runner.run(step)  # the same token at the same position (its cache slot rewritten alike)
    assert torch.isfinite(again.logits).all()
    assert torch.equal(again.logits, out.logits)


def test_decode_steps_update_their_metadata_in_place_while_the_batch_holds():
    cfg = preset("tiny")
    engine = LLMEngine(build_model(cfg, seed=0), EngineConfig(kv_cache_bytes=16 * 2**20, block_size=4))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for prompt in ([1, 2, 3], list(range(10, 17))):
        engine.add_request(prompt, params)
    engine.step()  # both prefills
    state = engine.runner.decode_batch
    engine.step()
    positions, rebuilds = state.positions, state.rebuilds
    for _ in range(8):  # across block boundaries: the new blocks' entries are written in place
        engine.step()
        assert state.positions is positions and state.rebuilds == rebuilds
        lens = [len(s.token_ids) - 2 for s in engine.scheduler.running]  # the step fed each its newest token
        assert positions.tolist() == lens
        for row, seq in zip(state.tables.tolist(), engine.scheduler.running):
            assert row[:len(seq.block_table)] == list(seq.block_table)
    engine.add_request([5, 6], params)  # the batch changes: rebuilt, then in place again
    engine.step()  # the new prompt beside the others' tokens
    engine.step()  # three sequences decoding: rebuilt
    assert state.rebuilds > rebuilds
    rebuilds = state.rebuilds
    engine.step()
    assert state.rebuilds == rebuilds


@pytest.mark.parametrize("kernels_on", [True, False])
def test_verification_chunks_run_the_decode_program_with_the_full_forward_logits(monkeypatch, kernels_on):
    """A token and its draft tokens (a speculative verification step), beside another sequence's
    one token: each row sees its own chunk's earlier rows, as the full forward does."""
    if not kernels_on:
        for name in ("kernel_layers_apply", "gemv_applies"):
            monkeypatch.setattr(decode, name, lambda *a: False)
    model = _model()
    runner = ModelRunner(model, PagedKVCache(model.cfg, 2 * BLOCKS, BS))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (9, 14)]
    tables = [tuple(range(BLOCKS)), tuple(range(BLOCKS, 2 * BLOCKS))]
    runner.run([Chunk(tokens=tuple(s), start=0, block_table=t, num_logits=1) for s, t in zip(seqs, tables)])
    new = [torch.randint(0, 200, (4,), generator=g).tolist(), torch.randint(0, 200, (1,), generator=g).tolist()]
    chunks = [Chunk(tokens=tuple(n), start=len(s), block_table=t, num_logits=len(n))
              for s, n, t in zip(seqs, new, tables)]
    assert runner.runs_decode_program(chunks)
    out = runner.run(chunks)
    with torch.no_grad():
        want = torch.cat([model(torch.tensor([s + n])).logits[0, -len(n):] for s, n in zip(seqs, new)])
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)


def test_a_block_table_short_of_its_position_is_an_error_not_block_0():
    from moegpt.infer.decode_batch import DecodeBatchState, DecodeRow

    state = DecodeBatchState(4, torch.device("cpu"))
    with pytest.raises(ValueError, match="position 9 needs 3 blocks, its block table has 2"):
        state.update([DecodeRow(seq_id=7, position=9, block_table=(3, 5))])
