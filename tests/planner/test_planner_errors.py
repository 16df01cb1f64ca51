"""Bad inputs fail before any arithmetic, with one line that names the bad value."""

import argparse

import pytest

from moegpt.planner.cli import add_plan_parser


def plan_args(argv):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    return parser.parse_args(["plan", *argv])


@pytest.mark.parametrize("argv, named", [
    (["--tp", "7"], "--tp 7"),  # 120 heads
    (["--batch", "-1"], "--batch -1"),
    (["--batch", "0"], "--batch 0"),
    (["--hardware", "tpu-v9"], "'tpu-v9'"),
    (["--preset", "gpt5"], "'gpt5'"),
    (["--mode", "serve"], "'serve'"),
    (["--tp", "16"], "--tp 16"),  # beyond the NVLink domain of 8
    (["--pp", "121"], "--pp 121"),
    (["--ep", "3"], "--ep 3"),
    (["--gpus", "4", "--tp", "8"], "--gpus 4"),
    (["--gpus", "16", "--tp", "8", "--dp", "3"], "dp(3)"),
    (["--weight-bytes", "3"], "--weight-bytes 3"),
    (["--kv-sharding", "sharded"], "'sharded'"),
    (["--zero-stage", "4"], "--zero-stage 4"),
    (["--mfu", "1.5"], "--mfu 1.5"),
    (["--hbm-efficiency", "0"], "--hbm-efficiency 0"),
    (["--context", "-5"], "--context -5"),
    (["--draft-tokens", "4"], "--draft-tokens"),
    (["--mode", "train", "--mfu", "0.3", "--days", "90"], "--days 90"),
    (["--mode", "train", "--gpus", "64", "--batch-tokens", "8192"], "--batch-tokens 8192"),
    (["--mode", "train", "--tokens", "13e12", "--days", "1"], "--days 1"),  # over 100% MFU
    (["--n-heads", "7"], "n_heads"),
    (["--markdown"], "--markdown"),
    (["--vision", "clip-vit-h-99"], "'clip-vit-h-99'"),
    (["--vision", "tiny", "--cross-attention-every", "0"], "--cross-attention-every 0"),
    (["--cross-attention-every", "2"], "--cross-attention-every 2 goes with --vision"),
])
def test_bad_input_is_one_line_naming_it(argv, named):
    args = plan_args(argv)
    with pytest.raises(ValueError) as e:
        args.func(args)
    message = str(e.value)
    assert "\n" not in message
    assert named in message


def test_a_plot_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = plan_args(["--plot", str(blocker / "plots")])
    with pytest.raises(ValueError) as e:
        args.func(args)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--plot {blocker / 'plots'}: ")


def test_the_command_exits_nonzero_with_one_line_and_no_traceback(capsys):
    from moegpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--tp", "7"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.strip() == "moegpt: error: --tp 7 does not divide n_heads (120)" and "Traceback" not in err


def test_eight_bit_weights_need_an_eight_bit_peak():
    from moegpt.planner.hardware import datasheet

    assert datasheet("a100-40gb").peak_for(1) == 624e12  # INT8 on A100
    assert datasheet("h100-sxm").peak_for(1) == 1978.9e12  # FP8 on H100


def test_non_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        plan_args(["--batch", "many"])
    assert "'many' is not a number" in capsys.readouterr().err
