"""ParallelDims: a layout that does not fit the world or the model fails at once, naming every value."""

import pytest

from moegpt.config import preset
from moegpt.parallel import ParallelDims, stage_layers

CFG = preset("tiny")  # 4 heads, 1 kv head, 4 layers, 16 experts, d_ff 256


def test_degrees_that_do_not_multiply_to_the_world_name_every_value():
    with pytest.raises(ValueError, match=r"tp\(2\) \* pp\(2\) \* ep\(1\) \* dp\(3\) = 12 != world_size\(8\)"):
        ParallelDims(dp=3, tp=2, pp=2).validate(8, CFG)


def test_every_problem_of_a_layout_is_reported_in_one_line():
    with pytest.raises(ValueError) as e:
        ParallelDims(tp=8, ep=3).validate(24, CFG)
    message = str(e.value)
    assert "\n" not in message
    assert "n_heads(4) is not divisible by tp(8)" in message
    assert "n_experts(16) is not divisible by ep(3)" in message


@pytest.mark.parametrize("dims, world, message", [
    (ParallelDims(pp=8), 8, r"n_layers\(4\) < pipeline stages\(8\)"),
    (ParallelDims(pp=2, schedule="interleaved-1f1b"), 2, "needs virtual_stages >= 2"),
    (ParallelDims(pp=2, first_stage_layers=4), 2, r"first_stage_layers\(4\) leaves 0 layers for 1 more stages"),
    (ParallelDims(dp=4, dp_replicate=2), 4, r"dp_replicate\(2\) is HSDP and needs FSDP"),
    (ParallelDims(dp=4, data_parallel="fsdp", dp_replicate=3), 4, r"dp\(4\) is not divisible by dp_replicate\(3\)"),
    (ParallelDims(ep=32), 32, r"n_experts\(16\) is not divisible by ep\(32\)"),
    (ParallelDims(tp=8), 8, r"n_heads\(4\) is not divisible by tp\(8\)"),
])
def test_layouts_that_do_not_fit_fail_before_any_work(dims, world, message):
    with pytest.raises(ValueError, match=message):
        dims.validate(world, CFG)


def test_bad_degrees_and_modes_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"tp=0 must be a positive integer"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match="'zero3' is not a valid DataParallel"):
        ParallelDims(data_parallel="zero3")


def test_first_stage_may_hold_fewer_layers():
    assert stage_layers(120, 15) == [8] * 15
    assert stage_layers(117, 15, first=5) == [5] + [8] * 14  # the embedding stage takes fewer layers
    assert stage_layers(12, 4, first=2) == [2, 4, 3, 3]
    assert stage_layers(10, 4) == [3, 3, 2, 2]


def test_mqa_kv_head_is_replicated_so_any_tp_dividing_heads_fits():
    ParallelDims(tp=4).validate(4, CFG)  # n_kv_heads = 1
    with pytest.raises(ValueError, match=r"n_kv_heads\(2\) is neither 1"):
        ParallelDims(tp=4).validate(4, CFG.replace(n_kv_heads=2))


def test_train_command_rejects_a_layout_that_does_not_fit_before_any_work(tmp_path, capsys, monkeypatch):
    from moegpt.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--tp", "2", "--ep", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "tp(2) * pp(1) * ep(3) * dp(1) = 6 != world_size(1)" in err and "n_experts(16) is not divisible by ep(3)" in err
    assert not (tmp_path / "run").exists()


def test_parallel_flags_without_torchrun_say_how_to_launch(tmp_path, capsys, monkeypatch):
    from moegpt.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--fsdp"])
    assert "layout 1 process (fsdp) needs torchrun: torchrun --nproc-per-node N" in capsys.readouterr().err
