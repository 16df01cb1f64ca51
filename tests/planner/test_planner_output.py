"""The readable table and the charts."""

import argparse

from moegpt.planner import plots
from moegpt.planner.cli import add_plan_parser


def run(argv, capsys) -> str:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_table_shows_units_and_warnings(capsys):
    out = run(["--tp", "8", "--pp", "16", "--gpus", "128", "--batch", "4096", "--gpu-hour-usd", "1"], capsys)
    assert "gpt4 (inference) on 128 x a100-40gb" in out
    assert "28.7 GB" in out and "tok/s" in out and "$0.003" in out
    assert "KV_DOES_NOT_FIT" in out
    assert "training" not in out.split("warnings")[0].split("decode")[1]  # the other mode's section is left out


def test_plots_write_three_pngs(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "BATCHES", (1, 64))
    monkeypatch.setattr(plots, "CONTEXTS", (1024, 8192))
    monkeypatch.setattr(plots, "DENSE_SIZES", (175e9,))
    paths = plots.write_plots(tmp_path)
    assert [p.name for p in paths] == ["bandwidth_vs_tokens_per_s.png", "mfu_cost_vs_batch.png",
                                       "kv_cache_vs_context.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
