"""The planner's formulas on small cases checked by hand."""

import math

import pytest

from moegpt.config import MLPKind, ModelConfig
from moegpt.counts import param_counts
from moegpt.planner.decode import experts_read_fraction, speculative_tokens_per_pass
from moegpt.planner.hardware import Hardware, PeakFlops
from moegpt.planner.inputs import make_inputs
from moegpt.planner.plan import plan

# 2 layers, d 8, 4 heads x 2, 1 KV head, GELU experts of d_ff 16, 4 experts top-2, vocab 10
SMALL = ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=16, mlp=MLPKind.GELU,
                    n_experts=4, top_k=2, max_seq_len=16)
# round numbers: 100 B of memory, 10 B/s, 1000 FLOP/s (2000 at 8-bit), NVLink 40 B/s
TOY = Hardware(name="toy", mem_bytes=1000.0, hbm_bytes_per_s=10.0, peak_flops=PeakFlops(bf16=1000.0, fp8=2000.0),
               nvlink_bytes_per_s=40.0, nic_bits_per_s_per_gpu=80.0, gpus_per_nvlink_domain=4)


def small(**kw):
    return plan(make_inputs(preset="small-test", model=SMALL, hardware=TOY, **kw))


def test_params_by_hand():
    p = small().params
    attention = 2 * (8 * 8 * 2 + 8 * 2 * 2)  # wq, wo (8x8) + wk, wv (8x2), per layer
    per_expert = 2 * (2 * 8 * 16)  # two matrices per GELU expert, per layer
    router, norms, embedding = 2 * 8 * 4, (2 * 2 + 1) * 8, 2 * 10 * 8
    shared = attention + router + norms + embedding
    assert (p.attention, p.per_expert_mlp, p.router, p.embedding) == (attention, per_expert, router, embedding)
    assert p.total == shared + 4 * per_expert
    assert p.active_per_token == shared + 2 * per_expert
    assert p.shared == shared


def test_flops_are_two_and_six_per_active_param_and_attention_separate():
    p = small(context=16)
    a = p.params.active_per_token
    assert p.flops.forward_per_token == 2 * a
    assert p.flops.forward_per_token_dense == 2 * p.params.total
    assert p.flops.train_per_token == 6 * a
    assert p.flops.attention_per_token_at_context == 4 * 2 * 16 * 8  # 4 * L * ctx * d_attn


def test_expert_fraction_and_tokens_per_expert():
    assert experts_read_fraction(1, 2, 16) == pytest.approx(2 / 16)
    assert experts_read_fraction(8, 2, 16) == pytest.approx(1 - (14 / 16) ** 8)
    m = small(batch=8).moe
    assert m.tokens_per_expert == 8 * 2 / 4
    assert m.expected_experts_touched == pytest.approx(4 * (1 - 0.5**8))


def test_decode_reference_algorithm_by_hand():
    # tp 2, pp 2, batch 4 -> 2 micro-batches of 2 tokens; context 4
    p = small(tp=2, pp=2, batch=4, context=4)
    c, d = p.params, p.decode
    f = 1 - (1 - 2 / 4) ** 2
    kv_token_gpu = 2 * (2 / 2) * 1 * 2 * 2  # 2 (K,V) x 1 layer x 1 head (rounded up) x Dh 2 x 2 bytes
    t_mem = ((c.shared + f * c.experts_total) / 4 * 2 + 2 * 4 * kv_token_gpu) / 10.0
    t_comp = 2 * (2 * c.active_per_token / 2 + 4 * 1 * 4 * 8) / 2 / 1000.0
    t_comm = 1 * 2 * 2 * (2 - 1) / 2 * 2 * 8 * 2 / (40.0 / 2)
    assert d.t_mem_s == pytest.approx(t_mem)
    assert d.t_compute_s == pytest.approx(t_comp)
    assert d.t_comm_s == pytest.approx(t_comm)
    assert d.stage_time_s == pytest.approx(max(t_mem, t_comp) + t_comm)
    assert d.tokens_per_s_per_user == pytest.approx(1 / (2 * d.stage_time_s))  # crosses both stages
    assert d.cluster_tokens_per_s == pytest.approx(4 / (2 * d.stage_time_s))
    assert p.roofline.bound == "memory"


def test_kv_heads_round_up_per_tp_rank_unless_split_by_sequence():
    rep = small(tp=4, batch=1, context=4).memory
    split = small(tp=4, batch=1, context=4, kv_sharding="batch").memory
    assert rep.kv_cache_bytes_per_token == 2 * 2 * 2 * 2  # K,V x 2 layers x Dh 2 x 2 B
    assert rep.kv_cache_bytes_per_token_per_gpu == rep.kv_cache_bytes_per_token  # one head copied to each rank
    assert split.kv_cache_bytes_per_token_per_gpu == rep.kv_cache_bytes_per_token / 4


def test_precision_selects_the_peak():
    assert small().decode.mfu == pytest.approx(small().decode.cluster_tokens_per_s * 2
                                               * small().params.active_per_token / 1000.0)
    assert small(weight_bytes=1).roofline.ridge_flop_per_byte == 2000.0 / 10.0


def test_cost_per_1k_tokens_and_mfu_override():
    p = small(gpu_hour_usd=3.6)
    tps = p.decode.cluster_tokens_per_s
    assert p.inference_cost.usd_per_1k_tokens == pytest.approx(1 * 3.6 / 3600 / tps * 1000)
    q = small(gpu_hour_usd=3.6, mfu=0.5)
    assert q.inference_cost.cluster_tokens_per_s == pytest.approx(0.5 * 1000.0 / (2 * q.params.active_per_token))
    assert q.inference_cost.implied_mfu == pytest.approx(0.5)


def test_training_time_cost_and_bubble():
    a = param_counts(SMALL).active_per_token
    t = small(mode="train", tp=1, pp=2, gpus=4, tokens=1e6, seq_len=16, batch_tokens=16 * 2 * 4, mfu=0.5,
              gpu_hour_usd=1.0).training
    assert t.total_flops == 6 * a * 1e6
    seconds = 6 * a * 1e6 / (4 * 1000.0 * 0.5)
    assert t.days == pytest.approx(seconds / 86_400)
    assert t.cost_usd == pytest.approx(4 * seconds / 3600)
    assert t.microbatches_per_replica == 4  # 128 tokens / 16 / dp 2 / micro-batch 1
    assert t.pipeline_bubble_fraction == pytest.approx(1 / (4 + 1))
    assert t.steps == pytest.approx(1e6 / 128)


def test_days_give_mfu_and_zero_stages_shard_state():
    t = small(mode="train", gpus=2, train_flops=1e8, days=1.0).training
    assert t.mfu == pytest.approx(1e8 / (2 * 1000.0 * 86_400))  # 58%
    z0 = small(mode="train", gpus=4).memory
    z1 = small(mode="train", gpus=4, zero_stage=1).memory
    z3 = small(mode="train", gpus=4, zero_stage=3).memory
    assert z1.optimizer_bytes_per_gpu == pytest.approx(z0.optimizer_bytes_per_gpu / 4)
    assert z1.grads_bytes_per_gpu == z0.grads_bytes_per_gpu
    assert z3.weights_bytes_per_gpu == pytest.approx(z0.weights_bytes_per_gpu / 4)
    assert z0.optimizer_bytes_per_gpu == pytest.approx(12 * param_counts(SMALL).total)


def test_speculative_and_bandwidth_targets():
    assert speculative_tokens_per_pass(4, 0.5) == pytest.approx((1 - 0.5**5) / 0.5)
    assert speculative_tokens_per_pass(4, 1.0) == 5
    d = small(tp=4, target_tps=2.0, overhead_factor=2.0).decode
    assert d.max_params_for_target_tps == pytest.approx(4 * 10.0 / (2 * 2.0 * 2.0))
    assert d.mfu_at_target_tps == pytest.approx(2.0 * 2 * small().params.active_per_token / (4 * 1000.0))


def test_gpt4_serving_layout_matches_hand_arithmetic():
    p = plan(make_inputs(preset="gpt4", tp=8, pp=16, gpus=128))
    assert p.memory.weights_bytes_per_gpu == pytest.approx(p.params.total * 2 / 128)
    assert p.memory.weights_params_per_node == pytest.approx(p.params.total / 16)
    assert p.parallelism.nodes == 16 and p.parallelism.layers_per_stage == 7.5
    assert math.isclose(p.memory.kv_cache_bytes_per_token, 2 * 120 * 128 * 2)
