"""The serving layout's arithmetic, without a process group: who holds what, micro-batches, and the
one-line errors of a layout that does not fit."""

import subprocess
import sys

import pytest

from moegpt.config import ModelConfig
from moegpt.infer.runner import Chunk
from moegpt.infer.sharded import micro_batches
from moegpt.parallel.serving import check_quantized_split, local_config, serve_layout, serve_rank, shard_slices
from moegpt.quant.scheme import parse_scheme

CFG = ModelConfig(vocab_size=300, d_model=64, n_layers=5, n_heads=4, n_kv_heads=1, d_ff=64, n_experts=4, top_k=2,
                  max_seq_len=128)


def test_ranks_are_pp_major_then_ep_then_tp_and_stages_take_their_layers():
    dims = serve_layout(tp=2, pp=2, ep=2, first_stage_layers=2)
    ranks = [serve_rank(dims, r, CFG.n_layers) for r in range(8)]
    assert [(r.pp, r.ep, r.tp) for r in ranks[:4]] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert (ranks[0].first_layer, ranks[0].last_layer) == (0, 2) and (ranks[7].first_layer, ranks[7].last_layer) == (2, 5)
    assert ranks[5].rank_at(0) == 1 and ranks[1].rank_at(1) == 5


def test_a_shard_holds_its_heads_ffn_experts_and_layers():
    r = serve_rank(serve_layout(tp=2, ep=2, pp=1), 3, CFG.n_layers)  # ep 1, tp 1
    local = local_config(CFG, r)
    assert (local.n_heads, local.n_kv_heads, local.d_ff, local.head_dim, local.n_experts) == (2, 1, 32, 16, 4)
    assert shard_slices("layers.0.attn.wq.weight", CFG, r) == (slice(32, 64), slice(None))
    assert shard_slices("layers.0.attn.wk.weight", CFG, r) == (slice(None), slice(None))  # MQA: replicated
    assert shard_slices("layers.0.attn.wo.weight", CFG, r) == (slice(None), slice(32, 64))
    assert shard_slices("layers.0.ffn.experts.w_up", CFG, r) == (slice(2, 4), slice(32, 64), slice(None))
    assert shard_slices("layers.0.ffn.experts.w_down", CFG, r) == (slice(2, 4), slice(None), slice(32, 64))
    last = serve_rank(serve_layout(pp=2), 1, CFG.n_layers)
    assert shard_slices("layers.0.attn.wq.weight", CFG, last) is None  # stage 0's layer
    assert shard_slices("embed.weight", CFG, last) is None
    assert shard_slices("embed.weight", CFG.replace(tie_embeddings=True), last) is not None  # the tied head


def test_micro_batches_are_contiguous_balanced_and_never_empty():
    chunks = [Chunk(tokens=(1,) * n, start=0, block_table=(0,), num_logits=1) for n in (1, 1, 1, 1, 30, 1)]
    for n in range(1, 8):
        groups = micro_batches(chunks, n)
        assert [c for g in groups for c in g] == chunks and all(groups) and len(groups) <= n
    assert [len(g) for g in micro_batches(chunks[:4], 2)] == [2, 2]


@pytest.mark.parametrize("flags, message", [
    (["--tp", "2"], "needs 2 processes: run under torchrun --nproc-per-node 2"),
    (["--tp", "0"], "tp=0 must be a positive integer"),
    (["--dist-timeout", "0", "--tp", "2"], "--dist-timeout=0.0 must be > 0"),
])
def test_a_layout_without_its_processes_is_a_one_line_error(tmp_path, flags, message):
    from moegpt.checkpoint.model_dir import save
    from moegpt.data.tokenizer import Tokenizer
    from moegpt.model import build_model

    save(build_model(CFG.replace(n_layers=2)), Tokenizer.train(["to be or not\n" * 20], vocab_size=300), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "moegpt", "generate", "--model", str(tmp_path), "--prompt", "to",
                           *flags], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_quantized_model_splits_over_tp_only_on_whole_words_groups_and_activation_blocks():
    big = ModelConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=8, head_dim=32, n_kv_heads=1, d_ff=256,
                      n_experts=4, top_k=2, max_seq_len=64)
    for name in ("int8", "int4"):
        check_quantized_split(big, parse_scheme(name, 32 if name == "int4" else None), 2)  # 128 of 256 inputs: fine
    # wo's 256 inputs come in blocks of 128 that one process quantizes together: 4 ranks would cut them
    with pytest.raises(ValueError, match=r"--tp 4 gives each rank 64 of wo's 256 inputs, which int8 weights split "
                                         r"only in multiples of 128"):
        check_quantized_split(big, parse_scheme("int8"), 4)
    small = big.replace(n_heads=4, head_dim=16, d_ff=64)  # 64 inputs, no activation blocks: 16 per rank
    with pytest.raises(ValueError, match="16 of wo's 64 inputs, which int4-g32 weights split only in multiples of 32"):
        check_quantized_split(small, parse_scheme("int4", 32), 4)
    with pytest.raises(ValueError, match="--tp 2: fp8 weights scale each row's activations as a whole"):
        check_quantized_split(big, parse_scheme("fp8"), 2)
    check_quantized_split(big, parse_scheme("fp8"), 1)  # one TP rank: any layout
