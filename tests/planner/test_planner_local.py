"""The `local` hardware entry: measured through the (faked) measuring functions, cached with the date."""

import datetime
import json

from moegpt.planner.inputs import make_inputs
from moegpt.planner.local import CACHE_FILE, Measurers, local_hardware
from moegpt.planner.plan import plan


def fake(calls):
    def copy(device):
        calls.append(("copy", device))
        return 20e9

    def matmul(dtype, device):
        calls.append((dtype, device))
        return {"fp32": 100e9, "bf16": 50e9}[dtype]

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


def test_plans_on_local_hardware(tmp_path):
    hw = local_hardware(tmp_path, fake([]), today=datetime.date(2024, 5, 1))
    p = plan(make_inputs(preset="tiny", hardware=hw, batch=4))
    assert p.to_dict()["hardware"]["nvlink_bytes_per_s"] is None
    assert p.decode.t_comm_s == 0 and p.decode.tokens_per_s_per_user > 0
    assert p.roofline.ridge_flop_per_byte == 50e9 / 25e9
