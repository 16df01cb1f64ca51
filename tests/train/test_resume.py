"""Checkpoints and exact resume: an interrupted run continues as if it never stopped."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from moegpt.checkpoint.store import latest_checkpoint, load_checkpoint, save_checkpoint
from moegpt.train.trainer import Trainer


def _run(model_cfg, train_cfg, out, sources, cache, resume=False, stop_at=None):
    trainer = Trainer(model_cfg, train_cfg, out, sources, cache, resume=resume)
    return trainer, trainer.run(stop_at=stop_at, progress=False)


def test_resumed_run_gives_bit_identical_losses_and_weights(tmp_path, small_source, micro_model, micro_train):
    cache = tmp_path / "cache"
    _, straight = _run(micro_model, micro_train, tmp_path / "a", small_source, cache)
    _, first = _run(micro_model, micro_train, tmp_path / "b", small_source, cache, stop_at=4)
    assert not first.finished and first.step == 4
    _, second = _run(micro_model, micro_train, tmp_path / "b", small_source, cache, resume=True)
    assert second.finished
    assert first.losses + second.losses == straight.losses  # exact float equality
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The log of the resumed run has each step exactly once.
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 9))


def test_batch_ramp_grows_batch_and_training_lowers_val_loss(tmp_path, small_source, micro_model, micro_train):
    rows = []
    trainer = Trainer(micro_model, micro_train, tmp_path / "r", small_source, tmp_path / "cache")
    result = trainer.run(progress=False, on_step=rows.append)
    sizes = [r["batch_size"] for r in rows]
    assert sizes[0] == 4 and sizes[-1] == 8 and sizes == sorted(sizes)
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    for key in ("loss", "aux_loss", "z_loss", "lr", "tokens_per_s", "mfu", "load_imbalance"):
        assert key in rows[-1]
    assert (tmp_path / "r" / "log.csv").read_text().startswith("step,loss,aux_loss")


def test_resume_with_a_different_config_names_the_values(tmp_path, small_source, micro_model, micro_train):
    _run(micro_model, micro_train, tmp_path / "r", small_source, tmp_path / "c", stop_at=3)
    with pytest.raises(ValueError, match=r"lr: 0.003 -> 0.001"):
        Trainer(micro_model, micro_train.__class__(**{**micro_train.to_dict(), "lr": 1e-3}), tmp_path / "r",
                small_source, tmp_path / "c", resume=True)
    with pytest.raises(ValueError, match=r"n_layers: 2 -> 3"):
        Trainer(micro_model.replace(n_layers=3), micro_train, tmp_path / "r", small_source, tmp_path / "c", resume=True)


def test_fresh_run_refuses_a_non_empty_out_and_leaves_it_untouched(tmp_path, small_source, micro_model, micro_train):
    _run(micro_model, micro_train, tmp_path / "r", small_source, tmp_path / "c", stop_at=3)
    with pytest.raises(ValueError, match="exists and is not empty; pass --resume"):
        Trainer(micro_model, micro_train, tmp_path / "r", small_source, tmp_path / "c")
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="exists and is not empty"):
        Trainer(micro_model, micro_train, exported, small_source, tmp_path / "c")
    assert (exported / "tokenizer.json").read_text() == "{}"


def test_crash_after_a_checkpoint_resumes_from_it_and_relogs_each_step_once(tmp_path, small_source, micro_model,
                                                                             micro_train):
    cache = tmp_path / "cache"
    _, straight = _run(micro_model, micro_train, tmp_path / "a", small_source, cache)

    def crash(row):
        if row["step"] == 5:  # checkpoints at 3 and 6: steps 4 and 5 are lost and must be redone
            raise RuntimeError("node failure")

    trainer = Trainer(micro_model, micro_train, tmp_path / "b", small_source, cache)
    with pytest.raises(RuntimeError):
        trainer.run(progress=False, on_step=crash)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by the crash
    resumed = Trainer(micro_model, micro_train, tmp_path / "b", small_source, cache, resume=True)
    assert resumed.step == 3
    result = resumed.run(progress=False)
    assert result.losses == straight.losses[3:]
    rows = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    csv_steps = [line.split(",")[0] for line in (tmp_path / "b" / "log.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(s) for s in range(1, 9)]


def test_resume_with_a_different_mixture_is_refused_before_tokenizing(tmp_path, small_source, micro_model, micro_train):
    _run(micro_model, micro_train, tmp_path / "r", small_source, tmp_path / "c", stop_at=3)
    other = (small_source[0].__class__(name="plays", epochs=1.0, paths=small_source[0].paths),)
    with pytest.raises(ValueError, match=r"data mixture differs \(\[\['plays', 2.0\]\] -> \[\['plays', 1.0\]\]\)"):
        Trainer(micro_model, micro_train, tmp_path / "r", other, tmp_path / "c", resume=True)


def test_resume_without_checkpoint_is_an_error(tmp_path, small_source, micro_model, micro_train):
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(micro_model, micro_train, tmp_path / "empty", small_source, tmp_path / "c", resume=True)


def test_crash_mid_write_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.ones(3)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000001"
    assert load_checkpoint(latest)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".step")]  # no half-written folder left


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path, 5, {"step": 5})
    (path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"step_000005.*corrupt"):
        load_checkpoint(path)


def test_old_checkpoints_are_pruned(tmp_path):
    for s in range(1, 5):
        save_checkpoint(tmp_path, s, {"step": s}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


def test_bf16_autocast_step_trains(tmp_path, small_source, micro_model, micro_train):
    cfg = micro_train.__class__(**{**micro_train.to_dict(), "bf16": True, "steps": 2, "eval_every": 2})
    result = Trainer(micro_model, cfg, tmp_path / "r", small_source, tmp_path / "c").run(progress=False)
    assert result.finished and all(math.isfinite(l) for l in result.losses)


def test_latest_falls_back_to_newest_complete_checkpoint_when_pointer_is_broken(tmp_path):
    for s in (9, 10):
        save_checkpoint(tmp_path, s, {"step": s}, keep=5)
    (tmp_path / "latest").write_text("")  # torn pointer
    assert latest_checkpoint(tmp_path).name == "step_000010"  # by number: 10 after 9
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_000010"


def test_pruning_orders_by_step_number_past_six_digits(tmp_path):
    for s in (999_999, 1_000_000, 1_000_001):
        save_checkpoint(tmp_path, s, {"step": s}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1000000", "step_1000001"]
