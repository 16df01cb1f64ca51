"""The moegpt command as a user runs it: info, train/resume, generate, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from moegpt.cli import main
from moegpt.counts import param_counts
from moegpt.config import preset


def test_info_json_reports_counts_from_counts_py(capsys):
    assert main(["info", "--preset", "gpt4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == param_counts(preset("gpt4")).total
    assert info["params"]["active_per_token"] > 2.7e11


def test_info_table_lists_totals(capsys):
    main(["info", "--preset", "small"])
    out = capsys.readouterr().out
    assert "518M" in out and "121M" in out


@pytest.mark.parametrize("argv, message", [
    (["info", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--out", "x", "--set", "n_kv_heads=5"], "n_heads (4) is not divisible by n_kv_heads (5)"),
    (["train", "--out", "x", "--set", "top_k=20"], "top_k (20) > n_experts (16)"),
    (["train", "--out", "x", "--set", "depth=3"], "unknown ModelConfig field(s): ['depth']"),
    (["train", "--out", "x", "--data", "text:abc"], "abc"),
    (["generate", "--model", "no/such/dir", "--prompt", "x"], "no/such/dir"),
    (["generate", "--model", "no/such/dir", "--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
    (["generate", "--model", "no/such/dir", "--prompt", "x", "--n", "0"], "n=0"),
    (["serve", "--model", "no/such/dir", "--max-request-bytes", "0"], "--max-request-bytes=0"),
    (["serve", "--model", "no/such/dir", "--api-key", " "], "--api-key must not be empty"),
    (["serve", "--model", "no/such/dir", "--chat-template", "no/such.jinja"], "no/such.jinja"),
])
def test_bad_input_is_one_line_error_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_stop_resume_then_generate_from_the_model_directory(tmp_path, small_source_path):
    common = ["--set", "vocab_size=512", "--set", "d_model=64", "--set", "n_layers=2", "--set", "d_ff=64",
              "--set", "n_experts=4", "--steps", "6", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "4",
              "--eval-every", "3", "--eval-sequences", "4", "--ckpt-every", "2", "--peak-flops", "1e11",
              "--data", f"plays={small_source_path}:1", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--out", str(tmp_path / "run")]
    run = [sys.executable, "-m", "moegpt", "train"]
    first = subprocess.run(run + common + ["--stop-at", "3"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "stopped at step 3" in first.stdout
    second = subprocess.run(run + common + ["--resume"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "model directory" in second.stdout
    gen = subprocess.run([sys.executable, "-m", "moegpt", "generate", "--model", str(tmp_path / "run"),
                          "--prompt", "KING:", "--max-tokens", "8", "--temperature", "0"],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("KING:") and len(gen.stdout) > len("KING:\n")
    for extra in (["--draft", str(tmp_path / "run")], ["--ngram"]):  # greedy speculative == greedy plain
        spec = subprocess.run(gen.args + extra, capture_output=True, text=True)
        assert spec.returncode == 0, spec.stderr
        assert spec.stdout == gen.stdout and "draft tokens accepted" in spec.stderr


@pytest.mark.slow
def test_demo_trains_saves_and_prints_samples(tmp_path, small_source_path):
    argv = [sys.executable, "-m", "moegpt", "demo", "--out", str(tmp_path / "demo"), "--steps", "4",
            "--set", "vocab_size=512", "--set", "d_model=64", "--set", "n_layers=2", "--set", "d_ff=64",
            "--set", "max_seq_len=64",  # shorter than a prompt and 120 sampled tokens: the samples stop at it
            "--seq-len", "32", "--eval-every", "2", "--eval-sequences", "8", "--ramp-tokens", "128",
            "--data", f"plays={small_source_path}:1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "unigram baseline" in done.stdout and "--- sample: 'ROMEO:\\n' ---" in done.stdout
    assert (tmp_path / "demo" / "config.json").exists() and (tmp_path / "demo" / "tokenizer.json").exists()
    assert "epochs seen so far: plays" in done.stdout
    again = subprocess.run(argv, capture_output=True, text=True)  # idempotent: replaces its own directory
    assert again.returncode == 0, again.stderr


def test_demo_refuses_a_directory_it_did_not_make(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(precious), "--no-progress"])
    assert "not made by 'moegpt demo'" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
