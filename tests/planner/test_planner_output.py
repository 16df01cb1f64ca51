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


def test_a_vision_tower_adds_its_section_from_the_shared_counts(capsys):
    """``--vision TOWER`` joins a tower preset to the model as `moegpt info --vision` does: the vision
    section holds counts.py's parameters and FLOPs, and the I/O ratio is vision's bytes over text's."""
    from moegpt.config import preset
    from moegpt.counts import cross_attention_flops_per_token, image_flops, vision_param_counts
    from moegpt.planner.inputs import make_inputs
    from moegpt.planner.plan import plan
    from moegpt.planner.table import render
    from moegpt.vision_config import VisionConfig, tower_preset

    cfg = preset("small")
    p = plan(make_inputs(model=cfg, vision_tower="clip-vit-b-16", cross_attention_every=3, bytes_per_token_text=3,
                         bytes_per_token_vision=750))
    v = VisionConfig.for_text(cfg, tower_preset("clip-vit-b-16"), cross_attention_every=3)
    assert p.vision.added_params == vision_param_counts(v).added and p.vision.cross_attention_layers == 4
    assert p.vision.flops_per_image == image_flops(v)
    assert p.vision.cross_attention_flops_per_token == cross_attention_flops_per_token(v)
    assert p.derived.vision_io_ratio == 250
    assert "vision\n  tower params" in render(p)
    assert plan(make_inputs(model=cfg)).vision is None and "vision" not in render(plan(make_inputs(model=cfg)))
