"""`moegpt train-vision`: the language model stays bit-identical unless unfrozen, the new parts learn,
a stopped run resumes bit-exactly, the settings are checked on resume, bad choices are one-line errors,
and the accuracy report scores what the model answers."""

from __future__ import annotations

import json

import pytest
import torch

from moegpt.checkpoint.model_dir import load, save
from moegpt.cli import main
from moegpt.config import preset
from moegpt.counts import vision_param_counts
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.model.vision.vision_model import VisionMoEGPT
from moegpt.train.vision_eval import Answers, scores


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = Tokenizer.train(["to be or not to be, that is the question: 2 red circles, top left\n" * 40], vocab_size=400)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=128)
    d = tmp_path_factory.mktemp("vision") / "base"
    save(build_model(cfg, seed=0), tok, d)
    return d


def _args(base, out, *extra):
    return ["train-vision", "--model", str(base), "--out", str(out), "--tower", "tiny", "--data", "shapes:1",
            "--seq-len", "64", "--batch-size", "4", "--micro-batch", "2", "--eval-every", "2", "--ckpt-every", "2",
            "--eval-sequences", "4", "--warmup-steps", "1", "--lr", "1e-2", "--no-progress", "--peak-flops", "1e11",
            "--no-eval", "--pretrain-steps", "2", *extra]


def test_the_text_model_stays_bit_identical_and_the_new_parts_learn(tmp_path, base_dir, capsys):
    out = tmp_path / "seeing"
    assert main(_args(base_dir, out, "--steps", "3")) == 0
    base, trained = load(base_dir).model.state_dict(), load(out)
    assert isinstance(trained.model, VisionMoEGPT)
    text = trained.model.text.state_dict()
    assert all(torch.equal(text[k], base[k]) for k in base)  # every text weight, bit for bit
    gates = [float(b.attn_gate) for b in trained.model.cross_attn.values()]
    assert all(g != 0.0 for g in gates)  # the gates opened from 0
    settings = json.loads((out / "vision_training.json").read_text())
    assert settings["train_text"] is False and settings["train_tower"] is True
    assert (out / "vision_tower" / "config.json").is_file()
    pretrained = json.loads((out / "image_pretraining.json").read_text())
    assert pretrained["steps"] == 2 and set(pretrained["accuracy"]) == {"count", "colour", "shape", "position"}
    # the planner reads the image side and the I/O per token this run measured (issue 15, item 8)
    capsys.readouterr()
    assert main(["plan", "--model", str(out), "--json"]) == 0
    d, io = json.loads(capsys.readouterr().out), json.loads((out / "vision_io.json").read_text())
    assert d["vision"]["added_params"] == vision_param_counts(trained.model.vision_cfg).added
    assert d["derived"]["vision_io_ratio"] == io["vision_bytes_per_token"] / io["text_bytes_per_token"] > 10


def test_train_text_unfreezes_the_language_model(tmp_path, base_dir):
    out = tmp_path / "all"
    assert main(_args(base_dir, out, "--steps", "2", "--train-text")) == 0
    base, text = load(base_dir).model.state_dict(), load(out).model.text.state_dict()
    assert any(not torch.equal(text[k], base[k]) for k in base)


def test_a_stopped_run_resumes_bit_exactly_and_refuses_other_settings(tmp_path, base_dir, capsys):
    out, whole = tmp_path / "stopped", tmp_path / "whole"
    assert main(_args(base_dir, out, "--steps", "4", "--stop-at", "2")) == 0
    with pytest.raises(SystemExit) as e:
        main(_args(base_dir, out, "--steps", "4", "--resume", "--latents", "32"))
    assert e.value.code == 2 and "fine-tuning settings differ" in capsys.readouterr().err
    assert main(_args(base_dir, out, "--steps", "4", "--resume")) == 0
    assert main(_args(base_dir, whole, "--steps", "4")) == 0
    resumed, unbroken = load(out).model.state_dict(), load(whole).model.state_dict()
    assert resumed.keys() == unbroken.keys() and all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    losses = [[json.loads(r)["loss"] for r in (d / "log.jsonl").read_text().splitlines() if '"loss"' in r]
              for d in (out, whole)]
    assert losses[0] == losses[1]


def test_a_used_out_directory_is_refused_before_any_pre_training(tmp_path, base_dir, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "log.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as e:
        main(_args(base_dir, tmp_path / "used", "--steps", "1"))
    captured = capsys.readouterr()
    assert e.value.code == 2 and "exists and is not empty" in captured.err and "pre-train" not in captured.out


@pytest.mark.parametrize("extra,message", [
    (["--freeze-tower"], "--freeze-tower with the fresh 'tiny' tower would train nothing"),
    (["--tower", "nowhere"], "unknown vision tower preset 'nowhere'"),
    (["--data", "pictures:1"], "unknown image source 'pictures'"),
    (["--cross-attention-every", "3"], "cross_attention_every=3 is more than the text model's 2 layers"),
    (["--pretrain-steps", "-1"], "--pretrain-steps -1 must be >= 0"),
], ids=["freeze-fresh", "tower", "data", "interval", "pretrain-steps"])
def test_bad_choices_are_one_line_errors(tmp_path, base_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(_args(base_dir, tmp_path / "x", "--steps", "1", *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_scores_read_transcriptions_and_scenes():
    text = scores(Answers("s", "screenshots", [], ["abcd", "xyz"], ["abcd", "xy"]))
    assert text == {"character_accuracy": pytest.approx(1 - 1 / 7), "exact_match": 0.5}
    scene = scores(Answers("p", "shapes", [], ["2 red circles, top left", "1 blue cross, center"],
                           ["2 red squares, top left", "garbled"]))
    assert scene["count_accuracy"] == 0.5 and scene["shape_accuracy"] == 0.0 and scene["position_accuracy"] == 0.5
