"""``torchrun -m moegpt train`` end to end: losses of one process in any layout, checkpoints that
load into another layout without skipping or repeating a sample, and a restart after a SIGKILL."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moegpt.data.sources import Source
from moegpt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from launch import HERE, torchrun  # noqa: E402

MODEL = ["--set", "vocab_size=512", "--set", "d_model=64", "--set", "n_layers=2", "--set", "d_ff=64",
         "--set", "n_experts=4", "--set", "max_seq_len=64"]
TRAIN = ["--steps", "6", "--seq-len", "32", "--batch-size", "8", "--micro-batch", "2", "--batch-start", "4",
         "--ramp-tokens", "256", "--warmup-steps", "2", "--eval-every", "3", "--ckpt-every", "3",
         "--eval-sequences", "8", "--peak-flops", "1e11", "--record-samples"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Data, the shared arguments, and the one-process reference: losses, sample ids, weights."""
    from moegpt.cli import build_parser
    from moegpt.train.cli import model_config_from_args, train_config_from_args
    from moegpt.data.sources import shakespeare_source

    root = tmp_path_factory.mktemp("dist_train")
    text = shakespeare_source().paths[0].read_text()
    (root / "plays.txt").write_text(text[:40_000])
    (root / "more.txt").write_text(text[40_000:60_000])
    # Two sources with different epoch counts: the mixture's interleaving must survive any layout.
    args = ["--data", f"plays={root / 'plays.txt'}:2,more={root / 'more.txt'}:1", "--cache-dir", str(root / "cache"),
            *MODEL, *TRAIN]
    parsed = build_parser().parse_args(["train", "--out", str(root / "ref"), *args])
    model_cfg, train_cfg = model_config_from_args(parsed), train_config_from_args(parsed)
    sources = (Source(name="plays", epochs=2.0, paths=(root / "plays.txt",)),
               Source(name="more", epochs=1.0, paths=(root / "more.txt",)))
    trainer = Trainer(model_cfg, train_cfg, root / "ref", sources, root / "cache")
    result = trainer.run(progress=False)
    # The one-process sample order: a fresh sampler and the same batch ramp, replayed.
    sampler = trainer.data.make_sampler(train_cfg.seed)
    samples, tokens = [], 0
    for _ in range(train_cfg.steps):
        b = trainer.batch_at(tokens)
        samples.append(sampler.next_batch(b).tolist())
        tokens += b * train_cfg.seq_len
    return dict(root=root, args=args, losses=result.losses, samples=samples,
                weights=load_file(root / "ref" / "model.safetensors"))


def _log(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_like_one_process(run, out: Path):
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, 7)), "every step logged exactly once"
    assert [r["samples"] for r in rows] == run["samples"], "a sample was skipped, repeated or reordered"
    assert {s for r in rows for s, _ in r["samples"]} == {0, 1}, "both sources are drawn"
    for r, want in zip(rows, run["losses"]):
        assert r["loss"] == pytest.approx(want, rel=1e-4), r["step"]
    got = load_file(out / "model.safetensors")
    for k, v in run["weights"].items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_checkpoint_saved_at_tp2_dp2_resumes_at_dp2_and_in_one_process(run, monkeypatch):
    from moegpt.cli import main

    root, args = run["root"], run["args"]
    torchrun(4, ["moegpt", "train", "--out", str(root / "tp2dp2"), *args, "--tp", "2", "--dp", "2", "--stop-at", "3"],
             module=True)
    rows = _log(root / "tp2dp2")
    assert rows[-1]["layout"] == "TP2xDP2" and len(rows[-1]["peak_mem_mb"]) == 4
    shutil.copytree(root / "tp2dp2", root / "as_dp2")
    # DP2 with ZeRO-1: the AdamW state lands in whichever rank's partition owns each parameter now.
    torchrun(2, ["moegpt", "train", "--out", str(root / "as_dp2"), *args, "--dp", "2", "--zero1", "--resume"],
             module=True)
    _assert_like_one_process(run, root / "as_dp2")
    # In this very process: a world of one, as torchrun --nproc-per-node 1 would set it up.
    shutil.copytree(root / "tp2dp2", root / "as_one")
    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(key, value)
    assert main(["train", "--out", str(root / "as_one"), *args, "--resume"]) == 0
    _assert_like_one_process(run, root / "as_one")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_half_written_checkpoint_is_never_resumed_from(run, tmp_path):
    from moegpt.parallel.checkpoint import latest

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000003").mkdir(parents=True)
    (ckpts / "step_000003" / "train.json").write_text("{}")
    (ckpts / ".step_000006.tmp").mkdir()  # a save that died before its rename
    (ckpts / "step_000009").mkdir()  # shards but no train.json: not complete
    assert latest(ckpts).name == "step_000003"


def test_rank_killed_mid_run_restarts_from_checkpoint_with_the_same_losses_and_weights(run):
    root, args = run["root"], run["args"]
    out = root / "restarted"
    proc = torchrun(2, [str(HERE / "kill_worker.py"), "1", "5", "--", "--out", str(out), *args, "--pp", "2"],
                    max_restarts=1)
    assert "from step 3 to 6" in proc.stdout, proc.stdout  # the second attempt resumed the step-3 checkpoint
    _assert_like_one_process(run, out)
