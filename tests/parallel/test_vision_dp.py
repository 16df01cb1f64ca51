"""``torchrun -m moegpt train-vision --dp 2``: data-parallel vision training gives one process's
losses and weights (the text model still bit-identical), and a layout other than data parallel is
refused in one line before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import preset
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model

sys.path.insert(0, str(Path(__file__).parent))
from launch import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_layouts")
    tok = Tokenizer.train(["to be or not to be, that is the question: 2 red circles, top left\n" * 40], vocab_size=400)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=64,
                                 n_experts=4, max_seq_len=128)
    save(build_model(cfg, seed=0), tok, root / "base")
    args = ["--model", str(root / "base"), "--tower", "tiny", "--data", "shapes:1", "--steps", "3", "--seq-len", "64",
            "--batch-size", "8", "--micro-batch", "2", "--warmup-steps", "1", "--lr", "1e-3", "--eval-every", "3",
            "--eval-sequences", "4", "--ckpt-every", "3", "--no-progress", "--no-eval", "--peak-flops", "1e11",
            "--pretrain-steps", "2"]
    return root, args


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("mode", [[], ["--zero1"]], ids=["replicate", "zero1"])
def test_data_parallel_vision_training_matches_one_process(base, mode):
    root, args = base
    one, dp2 = root / "one", root / f"dp2{''.join(mode)}"
    if not one.exists():
        subprocess.run([sys.executable, "-m", "moegpt", "train-vision", "--out", str(one), *args], check=True,
                       capture_output=True)
    torchrun(2, ["moegpt", "train-vision", "--out", str(dp2), *args, "--dp", "2", *mode], module=True)
    assert losses(dp2) == pytest.approx(losses(one), rel=1e-4)
    a, b = load(one).model.state_dict(), load(dp2).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    text, base_text = load(dp2).model.text.state_dict(), load(root / "base").model.state_dict()
    assert all(torch.equal(text[k], base_text[k]) for k in base_text)


def test_a_tensor_parallel_layout_is_refused_in_one_line(base):
    root, args = base
    with pytest.raises(AssertionError) as e:
        torchrun(2, ["moegpt", "train-vision", "--out", str(root / "tp2"), *args, "--tp", "2"], module=True)
    assert "vision training runs data parallel only (--dp, --zero1), not --tp 2 --pp 1 --ep 1" in str(e.value)
    assert not (root / "tp2").exists()
