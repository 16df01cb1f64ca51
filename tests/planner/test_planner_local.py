"""The `local` hardware entry: measured through the (faked) measuring functions, cached with the date."""

import datetime
import json

import pytest

from moegpt.config import preset
from moegpt.planner.hardware import Hardware, PeakFlops, datasheet
from moegpt.planner.inputs import make_inputs
from moegpt.planner.local import CACHE_FILE, Measurers, local_hardware
from moegpt.planner.plan import plan


def fake(calls):
    def copy(device):
        calls.append(("copy", device))
        return 20e9

    def matmul(dtype, device):
        calls.append((dtype, device))
        return {"fp32": 100e9, "bf16": 50e9, "int8": 200e9}[dtype]

    def read(device):
        calls.append(("read", device))
        return 25e9

    return Measurers(copy_bandwidth=copy, matmul_flops=matmul, read_bandwidth=read)


def test_measures_once_then_reads_the_cache(tmp_path):
    calls = []
    day = datetime.date(2024, 5, 1)
    hw = local_hardware(tmp_path, fake(calls), today=day)
    assert (hw.name, hw.hbm_bytes_per_s, hw.peak_flops.bf16, hw.peak_flops_fp32) == ("local", 25e9, 50e9, 100e9)
    assert hw.measured_on.startswith("2024-05-01")
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert cached["date"] == "2024-05-01" and cached["copy_bytes_per_s"] == 20e9
    assert cached["read_bytes_per_s"] == 25e9  # the HBM figure is the read one; the copy one is kept
    n = len(calls)
    again = local_hardware(tmp_path, fake(calls), today=datetime.date(2024, 6, 1))
    assert len(calls) == n and again == hw  # from the cache
    local_hardware(tmp_path, fake(calls), remeasure=True, today=datetime.date(2024, 6, 1))
    assert len(calls) == 2 * n
    assert json.loads((tmp_path / CACHE_FILE).read_text())["date"] == "2024-06-01"


def test_a_broken_cache_is_measured_again(tmp_path):
    (tmp_path / CACHE_FILE).write_text("{not json")
    calls = []
    local_hardware(tmp_path, fake(calls), today=datetime.date(2024, 5, 1))
    assert calls


def test_a_cache_from_another_device_is_measured_again(tmp_path):
    local_hardware(tmp_path, fake([]), today=datetime.date(2024, 5, 1))
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    (tmp_path / CACHE_FILE).write_text(json.dumps({**cached, "device_name": "another machine"}))
    calls = []
    local_hardware(tmp_path, fake(calls), today=datetime.date(2024, 5, 2))
    assert calls and json.loads((tmp_path / CACHE_FILE).read_text())["device_name"] == cached["device_name"]


def test_plans_on_local_hardware(tmp_path):
    hw = local_hardware(tmp_path, fake([]), today=datetime.date(2024, 5, 1))
    p = plan(make_inputs(preset="tiny", hardware=hw, batch=4))
    assert p.to_dict()["hardware"]["nvlink_bytes_per_s"] is None
    assert p.decode.t_comm_s == 0 and p.decode.tokens_per_s_per_user > 0
    assert p.roofline.ridge_flop_per_byte == 50e9 / 25e9


# ---- the prediction `moegpt plan --hardware local --model DIR --batch B` makes, by hand ----------
# A measured machine: 20 GB/s read bandwidth (a read stream), 100 GFLOP/s fp32 matmul.
MEASURED = Hardware(name="local", mem_bytes=1e12, hbm_bytes_per_s=20e9, peak_flops=PeakFlops(bf16=1e9),
                    nvlink_bytes_per_s=None, nic_bits_per_s_per_gpu=None, gpus_per_nvlink_domain=1,
                    measured_on="2024-05-01 (test)", peak_flops_fp32=100e9)
# small: 12 layers, d 768, 12 query heads x 64, 1 KV head, 16 SwiGLU experts (d_ff 1024) top-2, vocab 32,000
L, D, H, DH, F, E, K, V = 12, 768, 12, 64, 1024, 16, 2, 32_000
ATTENTION = L * (2 * D * H * DH + 2 * D * 1 * DH)  # wq, wo; wk, wv
EXPERT = 3 * D * F  # one SwiGLU expert of one layer
ROUTER, NORMS, LM_HEAD = L * D * E, (2 * L + 1) * D, V * D


def params_read(batch: int) -> float:
    """What one decode step of ``batch`` tokens reads: attention, routers, norms, the LM head, one
    embedding row per token, and the distinct experts the batch touches in each layer."""
    experts_touched = E * (1 - (1 - K / E) ** batch)
    return ATTENTION + ROUTER + NORMS + LM_HEAD + batch * D + L * experts_touched * EXPERT


def local_plan(batch: int, context: int, **kw):
    return plan(make_inputs(model=preset("small"), hardware=MEASURED, batch=batch, context=context, weight_bytes=4,
                            kv_bytes=4, **kw))


def test_batch_1_reads_two_experts_per_layer_one_embedding_row_and_the_kv_cache():
    assert params_read(1) == 96_701_952  # of 517,638,912: top-2 of 16 experts, no unread embedding rows
    p = local_plan(1, context=100)
    kv = 100 * 2 * L * 1 * DH * 4  # K and V of 100 positions, 12 layers, one KV head, fp32
    assert p.reads.weight_bytes == pytest.approx(4 * 96_701_952)
    assert p.reads.kv_bytes == kv
    assert p.decode.t_mem_s == pytest.approx((4 * 96_701_952 + kv) / 20e9)
    flops = 2 * (ATTENTION + ROUTER + LM_HEAD + L * K * EXPERT) + 4 * L * 100 * H * DH  # matmuls + attention
    assert p.decode.t_compute_s == pytest.approx(flops / 100e9)
    assert p.roofline.bound == "memory"
    assert p.decode.cluster_tokens_per_s == pytest.approx(20e9 / (4 * 96_701_952 + kv))


def test_batch_16_reads_the_experts_sixteen_tokens_touch():
    p = local_plan(16, context=100)
    touched = E * (1 - (14 / 16) ** 16)  # 14.1 of 16 experts per layer
    assert p.moe.expected_experts_touched == pytest.approx(touched)
    assert p.reads.weight_bytes == pytest.approx(4 * params_read(16))
    assert p.reads.kv_bytes == 16 * 100 * 2 * L * DH * 4
    t_mem = (4 * params_read(16) + p.reads.kv_bytes) / 20e9
    t_comp = 16 * (2 * (ATTENTION + ROUTER + LM_HEAD + L * K * EXPERT) + 4 * L * 100 * H * DH) / 100e9
    assert p.decode.cluster_tokens_per_s == pytest.approx(16 / max(t_mem, t_comp))


def test_measured_hardware_looks_up_embedding_rows_datasheets_follow_the_reference():
    by_default = local_plan(1, context=100)
    reference = local_plan(1, context=100, embedding_lookup=False)
    unread = (V - 1) * D * 4  # the reference algorithm reads the whole input embedding
    assert reference.reads.weight_bytes - by_default.reads.weight_bytes == pytest.approx(unread)
    sheet = plan(make_inputs(model=preset("small"), hardware=datasheet("a100-40gb"), batch=1))
    looked_up = plan(make_inputs(model=preset("small"), hardware=datasheet("a100-40gb"), batch=1,
                                 embedding_lookup=True))
    assert sheet.reads.weight_bytes - looked_up.reads.weight_bytes == pytest.approx((V - 1) * D * 2)
