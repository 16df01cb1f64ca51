"""`moegpt plan --measure-efficiency`: hbm_efficiency = roofline memory time / (t_matmul + t_kv), and
t_software added to the stage time, from faked measurers with numbers checked by hand, and one real
measurement."""

import argparse
import datetime
import json
import math
from dataclasses import replace

import pytest

from moegpt.config import MLPKind, preset
from moegpt.planner.cli import add_plan_parser
from moegpt.planner.hardware import Hardware, PeakFlops
from moegpt.planner.inputs import make_inputs
from moegpt.planner.local import Measurers, measure, write_cache
from moegpt.planner.local_decode import (DecodeMeasurers, decode_matmuls, experts_touched,
                                         measure_decode_efficiency, rows_per_expert, software_step_s,
                                         step_matmul_s, with_measured_efficiency)
from moegpt.planner.plan import plan

# 1 GB/s read, a fast fp32 peak: every plan here is memory-bound
LOCAL = Hardware(name="local", mem_bytes=16e9, hbm_bytes_per_s=1e9, peak_flops=PeakFlops(bf16=1e12),
                 nvlink_bytes_per_s=None, nic_bits_per_s_per_gpu=None, gpus_per_nvlink_domain=1,
                 measured_on="2024-05-01 (test)", peak_flops_fp32=1e12)
# 2 layers, d 32, 4 query heads x 8, 1 KV head, 4 SwiGLU experts (d_ff 48) top-2, vocab 128 untied
CFG = preset("tiny").replace(vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=48, n_experts=4)


def fake_measurers(calls: list, matmul_s: float = 1e-3, step_s: float = 5e-3) -> DecodeMeasurers:
    def matmul(product, weight_bytes):
        calls.append(("matmul", product.shape, weight_bytes))
        return matmul_s

    def step(cfg, batch, context, weight_bytes):
        calls.append(("step", cfg, batch, context, weight_bytes))
        return step_s

    return DecodeMeasurers(matmul_s=matmul, step_s=step)


def tiny_inputs(batch=1, context=10):
    return make_inputs(preset="test", model=CFG, hardware=LOCAL, batch=batch, context=context, weight_bytes=4,
                       kv_bytes=4)


# ---- (a) eta from fake measurers, by hand --------------------------------------------------------

def test_eta_is_the_roofline_memory_time_over_the_measured_step():
    calls = []
    m = measure_decode_efficiency(tiny_inputs(), fake_measurers(calls))
    # bytes at efficiency 1: attention 2 x (32x32 + 8x32 + 8x32 + 32x32) = 5,120; routers 2 x 4x32 = 256;
    # norms 5 x 32 = 160; LM head 4,096 + one embedding row 32; experts: 2 of 4 per layer at batch 1,
    # 2 layers x 2 x 3 x 32x48 = 18,432. Weights (5,120 + 256 + 160 + 4,128 + 18,432) x 4 B = 112,384 B;
    # KV: 10 positions x 2 (K, V) x 2 layers x 8 x 4 B = 1,280 B. At 1 GB/s:
    assert m.t_roofline_mem_s == pytest.approx(113_664e-9)
    assert m.t_kv_s == pytest.approx(1_280e-9)
    # products per step: q, k, v, o and the router in 2 layers (10); 2 experts x 3 matrices x 2 layers
    # (12); the head (1): 23 of 1 ms each
    assert m.t_matmul_s == pytest.approx(23e-3)
    assert m.t_software_s == 5e-3
    assert m.eta == pytest.approx(113_664e-9 / (23e-3 + 1_280e-9))
    assert m.hbm_efficiency == m.eta
    # each distinct shape timed once: wq = wo (32x32), wk = wv, router, expert gate = up, down, head
    assert len([c for c in calls if c[0] == "matmul"]) == 6
    (step,) = [c for c in calls if c[0] == "step"]
    _, small, batch, context, weight_bytes = step
    assert (batch, context, weight_bytes) == (1, 10, 4)
    same = ("n_layers", "n_heads", "n_kv_heads", "n_experts", "top_k", "mlp", "moe_every", "capacity_factor")
    assert all(getattr(small, f) == getattr(CFG, f) for f in same)
    assert (small.d_model, small.head_dim, small.d_ff, small.vocab_size) == (64, 8, 16, 256)


def test_planning_with_it_makes_the_memory_time_the_measured_reads_and_adds_the_software_time():
    inp = tiny_inputs(batch=3, context=40)
    m = measure_decode_efficiency(inp, fake_measurers([]))
    roofline, refined = plan(inp), plan(with_measured_efficiency(inp, m))
    assert roofline.decode.t_mem_s == pytest.approx(m.t_roofline_mem_s)
    assert refined.decode.t_mem_s == pytest.approx(m.t_matmul_s + m.t_kv_s)
    assert refined.decode.t_compute_s < refined.decode.t_mem_s and refined.decode.t_comm_s == 0
    assert refined.decode.stage_time_s == pytest.approx(m.t_matmul_s + m.t_kv_s + m.t_software_s)
    assert refined.decode.cluster_tokens_per_s == pytest.approx(3 / m.t_step_s)
    assert roofline.decode.stage_time_s == pytest.approx(max(roofline.decode.t_mem_s, roofline.decode.t_compute_s))
    d, d0 = refined.to_dict(), roofline.to_dict()
    assert d["inputs"]["efficiency"]["hbm_efficiency"] == pytest.approx(m.eta)
    assert {k: set(v) if isinstance(v, dict) else None for k, v in d.items()} == \
        {k: set(v) if isinstance(v, dict) else None for k, v in d0.items()}  # the same fields
    (note,) = [w for w in d["warnings"] if w["code"] == "MEASURED_EFFICIENCY"]
    assert "t_matmul" in note["message"] and "t_software" in note["message"]


def test_reads_faster_than_the_roofline_are_capped_at_efficiency_1():
    m = measure_decode_efficiency(tiny_inputs(), fake_measurers([], matmul_s=1e-9, step_s=1e-9))
    assert m.eta > 1 and m.hbm_efficiency == 1.0
    note = plan(with_measured_efficiency(tiny_inputs(), m)).warnings[-1]
    assert note.code == "MEASURED_EFFICIENCY" and "capped at 1" in note.message


# ---- (b) which products a step makes -------------------------------------------------------------

def test_experts_touched_and_rows_per_expert():
    assert experts_touched(1, 2, 16) == pytest.approx(2)  # top-2: two experts, one row each
    assert rows_per_expert(1, 2, 2) == 1
    assert experts_touched(16, 2, 16) == pytest.approx(16 * (1 - (7 / 8) ** 16))  # 14.10
    assert rows_per_expert(16, 2, experts_touched(16, 2, 16)) == 2  # 32 rows over 14.1 experts
    assert experts_touched(3, 2, 4) == pytest.approx(3.5)  # 4 x (1 - 1/8)
    assert rows_per_expert(3, 2, 3.5) == 2  # 6 / 3.5 = 1.71


def test_products_of_a_gelu_model_with_dense_layers_and_a_tied_head():
    cfg = CFG.replace(n_layers=4, moe_every=2, mlp=MLPKind.GELU, tie_embeddings=True)  # layers 1 and 3 MoE
    products = {p.name: p for p in decode_matmuls(cfg, batch=3)}
    assert set(products) == {"wq", "wk", "wv", "wo", "router", "expert up", "expert down", "dense up", "dense down",
                             "lm head"}
    assert (products["wk"].rows, products["wk"].out_features, products["wk"].in_features) == (3, 8, 32)
    assert products["wq"].count == 4 and products["router"].count == 2
    up, down = products["expert up"], products["expert down"]
    assert (up.rows, up.out_features, up.in_features, up.count) == (2, 48, 32, pytest.approx(2 * 3.5))
    assert (down.out_features, down.in_features) == (32, 48)
    assert (products["dense up"].rows, products["dense up"].count) == (3, 2)
    head = products["lm head"]
    assert (head.rows, head.out_features, head.count, head.in_by_out) == (3, 128, 1, False)  # the embedding table
    assert all(p.in_by_out for p in products.values() if p is not head)
    swiglu = {p.name for p in decode_matmuls(CFG, batch=1)}
    assert {"expert gate", "expert up", "expert down"} <= swiglu and not any(n.startswith("dense") for n in swiglu)


def test_each_shape_is_timed_once_and_counted_per_use():
    products = decode_matmuls(CFG, batch=1)
    timed = []
    total = step_matmul_s(products, lambda p: timed.append(p.shape) or p.out_features * 1e-6)
    assert len(timed) == len(set(timed)) == 6
    assert total == pytest.approx(sum(p.count * p.out_features * 1e-6 for p in products))


def test_software_time_beyond_the_cap_is_extrapolated_linearly():
    asked = []

    def step_s(context):
        asked.append(context)
        return 1e-3 + 2e-6 * context

    assert software_step_s(step_s, 500, cap=2048) == pytest.approx(1e-3 + 2e-6 * 500) and asked == [500]
    asked.clear()
    assert software_step_s(step_s, 8192, cap=2048) == pytest.approx(1e-3 + 2e-6 * 8192)
    assert asked == [1024, 2048]


# ---- (c) the command line ------------------------------------------------------------------------

def plan_args(argv, measurers=None):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(), decode_measurers=measurers)
    return parser.parse_args(["plan", *argv])


@pytest.mark.parametrize("argv, named", [
    (["--measure-efficiency"], "--hardware 'a100-40gb'"),
    (["--hardware", "h100-sxm", "--measure-efficiency"], "'h100-sxm'"),
    (["--hardware", "local", "--mode", "train", "--measure-efficiency"], "--mode 'train'"),
    (["--hardware", "local", "--hbm-efficiency", "0.5", "--measure-efficiency"], "--hbm-efficiency 0.5"),
    (["--hardware", "local", "--pp", "2", "--measure-efficiency"], "--pp 2"),
])
def test_what_cannot_be_measured_is_one_line_before_anything_is_measured(argv, named, tmp_path):
    args = plan_args([*argv, "--cache-dir", str(tmp_path)])
    with pytest.raises(ValueError) as e:
        args.func(args)
    assert "\n" not in str(e.value) and named in str(e.value) and "--measure-efficiency" in str(e.value)
    assert not any(tmp_path.iterdir())  # this machine was not measured


@pytest.fixture
def cached_machine(tmp_path):
    """A `local` cache in tmp_path, as if this machine read 1 GB/s, so the CLI measures nothing."""
    fake = Measurers(copy_bandwidth=lambda d: 1e9, matmul_flops=lambda dtype, d: 1e12, read_bandwidth=lambda d: 1e9)
    write_cache(tmp_path, measure(fake, datetime.date(2024, 5, 1)))
    return tmp_path


def test_the_cli_plans_with_the_measured_efficiency(cached_machine, capsys):
    calls = []
    fakes = lambda: fake_measurers(calls)  # noqa: E731
    argv = ["--hardware", "local", "--cache-dir", str(cached_machine), "--preset", "tiny", "--batch", "2",
            "--context", "64", "--measure-efficiency"]
    args = plan_args([*argv, "--json"], fakes)
    assert args.func(args) == 0
    d = json.loads(capsys.readouterr().out)
    expected = measure_decode_efficiency(make_inputs(preset="tiny", hardware=LOCAL, batch=2, context=64),
                                         fake_measurers([]))
    assert d["inputs"]["efficiency"]["hbm_efficiency"] == pytest.approx(expected.eta)
    assert d["decode"]["t_mem_s"] == pytest.approx(expected.t_matmul_s + expected.t_kv_s)
    assert d["decode"]["stage_time_s"] == pytest.approx(expected.t_step_s)
    assert "MEASURED_EFFICIENCY" in {w["code"] for w in d["warnings"]}
    args = plan_args(argv, fakes)
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "hbm_efficiency" in table and "measured" in table and "t_matmul" in table and "t_software" in table


@pytest.mark.parametrize("extra, measured", [
    ([], True),  # --hardware local --model DIR: how fast our engine decodes this model here
    (["--no-measure-efficiency"], False),  # the bare roofline
    (["--hbm-efficiency", "0.5"], False),  # an efficiency given is not measured
    (["--mode", "train"], False),
])
def test_local_hardware_with_a_model_directory_measures_by_default(extra, measured, cached_machine, tmp_path,
                                                                   capsys):
    from moegpt.checkpoint.model_dir import save
    from moegpt.model import build_model

    calls = []
    fakes = lambda: fake_measurers(calls)  # noqa: E731
    model_dir = tmp_path / "model"
    save(build_model(CFG.replace(max_seq_len=128), seed=0), None, model_dir)
    args = plan_args(["--hardware", "local", "--cache-dir", str(cached_machine), "--model", str(model_dir),
                      "--batch", "2", "--context", "64", "--json", *extra], fakes)
    assert args.func(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert bool(calls) == measured
    assert ("MEASURED_EFFICIENCY" in {w["code"] for w in d["warnings"]}) == measured
    before = len(calls)
    args = plan_args(["--cache-dir", str(cached_machine), "--preset", "tiny", "--json"], fakes)  # a datasheet GPU: never
    assert args.func(args) == 0 and len(calls) == before


# ---- (d) one real measurement --------------------------------------------------------------------

def test_a_real_measurement_of_a_tiny_model_directory(tmp_path):
    from moegpt.cli import engine_decode_measurers
    from moegpt.checkpoint.model_dir import read_config, save
    from moegpt.model import build_model
    from moegpt.planner.inputs import model_dir_bytes

    save(build_model(CFG.replace(max_seq_len=128), seed=0), None, tmp_path)
    width = model_dir_bytes(tmp_path)
    inp = make_inputs(preset=str(tmp_path), model=read_config(tmp_path), hardware=replace(LOCAL, hbm_bytes_per_s=20e9),
                      batch=4, context=40, weight_bytes=width, kv_bytes=width)
    m = measure_decode_efficiency(inp, engine_decode_measurers(pool_bytes=8 * 2**20, steps=6))
    for t in (m.t_roofline_mem_s, m.t_matmul_s, m.t_kv_s, m.t_software_s):
        assert 0 < t < 1 and math.isfinite(t)
    assert 0 < m.eta <= 1.5
