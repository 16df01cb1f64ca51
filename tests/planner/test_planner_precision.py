"""fp32 model directories: 4-byte weights/KV from config.json's dtype, the fp32 peak, read bandwidth."""

import json

import pytest

from moegpt.config import preset
from moegpt.hardware import measure_read_bandwidth
from moegpt.planner.hardware import Hardware, PeakFlops, datasheet
from moegpt.planner.inputs import make_inputs, model_dir_bytes
from moegpt.planner.plan import plan

LOCAL = Hardware(name="local", mem_bytes=1e12, hbm_bytes_per_s=20e9, peak_flops=PeakFlops(bf16=1e9),
                 nvlink_bytes_per_s=None, nic_bits_per_s_per_gpu=None, gpus_per_nvlink_domain=1,
                 measured_on="2024-05-01", peak_flops_fp32=100e9)


@pytest.mark.parametrize("dtype, width", [("float32", 4), ("bfloat16", 2), ("float16", 2), (None, 2)])
def test_model_dir_bytes_follow_torch_dtype(tmp_path, dtype, width):
    cfg = {} if dtype is None else {"torch_dtype": dtype}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert model_dir_bytes(tmp_path) == width
    (tmp_path / "config.json").write_text(json.dumps({} if dtype is None else {"dtype": dtype}))  # transformers 5
    assert model_dir_bytes(tmp_path) == width


def test_four_byte_weights_use_the_fp32_peak_and_double_the_bytes():
    p2 = plan(make_inputs(model=preset("small"), hardware=LOCAL, batch=1, context=96))
    p4 = plan(make_inputs(model=preset("small"), hardware=LOCAL, batch=1, context=96, weight_bytes=4, kv_bytes=4))
    assert p4.roofline.ridge_flop_per_byte == 100e9 / 20e9
    assert p4.decode.t_mem_s == pytest.approx(2 * p2.decode.t_mem_s)
    assert p4.roofline.bound == "memory" and p2.roofline.bound == "compute"  # bf16 on a CPU: 1 GFLOP/s


def test_datasheet_fp32_is_the_cuda_core_figure():
    assert datasheet("a100-40gb").peak_for(4) == 19.5e12 and datasheet("h100-sxm").peak_for(4) == 67e12
    no_fp32 = Hardware(name="x", mem_bytes=1e9, hbm_bytes_per_s=1e9, peak_flops=PeakFlops(bf16=1e12), nvlink_bytes_per_s=None,
                  nic_bits_per_s_per_gpu=None, gpus_per_nvlink_domain=1)
    with pytest.raises(ValueError, match="--weight-bytes 4: x has no fp32 peak"):
        make_inputs(preset="tiny", hardware=no_fp32, weight_bytes=4)


def test_read_bandwidth_is_positive_and_quick():
    assert measure_read_bandwidth(n_bytes=4 * 2**20, repeats=2) > 0
