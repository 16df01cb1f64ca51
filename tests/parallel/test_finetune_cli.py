"""``torchrun -m moegpt finetune``: a data-parallel fine-tuning run gives one process's losses and
weights, and a pipeline layout is refused in one line before any work."""

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
    root = tmp_path_factory.mktemp("finetune_layouts")
    tok = Tokenizer.train(["to be or not to be, that is the question of kings and queens\n" * 40], vocab_size=300)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=64,
                                 n_experts=4, max_seq_len=64)
    save(build_model(cfg, seed=0), tok, root / "base")
    rows = [{"messages": [{"role": "user", "content": f"to be {'or not ' * (i % 3)}?"},
                          {"role": "assistant", "content": "that is" if i % 2 else "the question of kings"}]}
            for i in range(60)]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(root / "base"), "--data", f"chats={root / 'chats.jsonl'}:2", "--steps", "4",
            "--seq-len", "48", "--batch-size", "8", "--micro-batch", "2", "--warmup-steps", "1", "--eval-every", "2",
            "--ckpt-every", "2", "--no-progress", "--no-eval", "--peak-flops", "1e11"]
    return root, args


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_data_parallel_fine_tuning_matches_one_process(base):  # ZeRO-1: a DDP-wrapped model, validated too
    root, args = base
    subprocess.run([sys.executable, "-m", "moegpt", "finetune", "--out", str(root / "one"), *args], check=True,
                   capture_output=True)
    torchrun(2, ["moegpt", "finetune", "--out", str(root / "dp2"), *args, "--dp", "2", "--zero1"], module=True)
    assert losses(root / "dp2") == pytest.approx(losses(root / "one"), rel=1e-4)
    one, dp2 = load(root / "one").model.state_dict(), load(root / "dp2").model.state_dict()
    for k in one:
        torch.testing.assert_close(dp2[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((root / "dp2" / "finetune.json").read_text())["packing"] is True


def test_a_pipeline_layout_is_refused_in_one_line(base):
    root, args = base
    with pytest.raises(AssertionError) as e:
        torchrun(2, ["moegpt", "finetune", "--out", str(root / "pp2"), *args, "--pp", "2"], module=True)
    assert "--pp 2: fine-tuning's packed rows do not run through a pipeline yet" in str(e.value)
    assert not (root / "pp2").exists()
