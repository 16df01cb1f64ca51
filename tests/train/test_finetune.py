"""Instruction tuning: packed rows compute what unpacked ones do, the loss is normalised over the
whole step, and `moegpt finetune` runs, records its settings and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from moegpt.checkpoint.model_dir import load, save
from moegpt.cli import main
from moegpt.config import preset
from moegpt.data.chat import chat_format
from moegpt.data.sft import IGNORE, PackedBatch, pack
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.train.step import LossWeights, packed_forward, packed_target_forward, train_step

NO_ROUTER_LOSS = LossWeights(aux=0.0, z=0.0)  # the router losses are per micro-batch by design (see step.py)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["to be or not to be, that is the question of kings and queens\n" * 40], vocab_size=300)


@pytest.fixture(scope="module")
def examples(tok):
    fmt = chat_format(tok)
    out = []
    for i in range(7):
        conv = [{"role": "user", "content": "to be " * (1 + i % 3) + "or not?"},
                {"role": "assistant", "content": "that is " * (1 + i % 4) + "the question"}]
        out.append(fmt.tokens(tok, conv))
    return out


def micro(vocab: int):
    cfg = preset("tiny").replace(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=128)
    return build_model(cfg, seed=0)


def grads(model, batch, micro_batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = train_step(model, opt, batch, micro_batch, NO_ROUTER_LOSS, grad_clip=1e9)
    return m.loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_rows_give_the_unpacked_loss_and_gradients(tok, examples):
    model = micro(tok.vocab_size)
    packed, unpacked = pack(examples, 96, 0), pack(examples, 96, 0, packing=False)
    assert len(packed) < len(unpacked) == len(examples)
    loss_p, g_p = grads(model, packed, len(packed))
    loss_u, g_u = grads(model, unpacked, len(unpacked))
    assert abs(loss_p - loss_u) <= 1e-6
    for n in g_p:
        torch.testing.assert_close(g_p[n], g_u[n], atol=1e-6, rtol=0, msg=n)


def test_the_head_at_the_targets_alone_gives_the_full_heads_loss_and_gradients(tok, examples):
    """train_step runs the output head only at target positions (packed_target_forward); the oracle
    is the head over every position, with the non-targets ignored by the loss."""
    batch = pack(examples, 96, 0)
    losses, grads_of = [], []
    for forward in (packed_target_forward, lambda m, rows: (packed_forward(m, rows), rows.targets)):
        model = micro(tok.vocab_size)
        out, targets = forward(model, batch)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
        loss.backward()
        losses.append(float(loss))
        grads_of.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert out.logits.shape[:2] == batch.targets.shape  # the oracle: every position's logits
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
    for n in grads_of[0]:
        torch.testing.assert_close(grads_of[0][n], grads_of[1][n], atol=1e-6, rtol=1e-5, msg=n)
    keep = int((batch.targets != IGNORE).sum())
    assert 0 < keep < batch.targets.numel()
    assert packed_target_forward(micro(tok.vocab_size), batch)[0].logits.shape == (keep, tok.vocab_size)


def test_a_packed_conversation_sees_only_itself(tok, examples):
    model = micro(tok.vocab_size).eval()
    row = pack(examples[:3], 128, 0)
    assert len(row) == 1
    with torch.no_grad():
        logits = packed_forward(model, row).logits[0]  # (T, V)
        changed = row.inputs.clone()
        changed[0, :len(examples[0][0]) - 1] = 7  # rewrite the first conversation
        other = packed_forward(model, PackedBatch(changed, row.targets, row.positions, row.docs)).logits[0]
        start = len(examples[0][0]) - 1
        end = start + len(examples[1][0]) - 1
        assert torch.equal(logits[start:], other[start:])  # the other conversations: bit for bit
        alone = model(torch.tensor([examples[1][0][:-1]])).logits[0]  # the second one by itself
    torch.testing.assert_close(logits[start:end], alone, atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_one_large_batch(tok, examples):
    model = micro(tok.vocab_size)
    batch = pack(examples, 60, 0)  # rows with different numbers of targets
    counts = (batch.targets != IGNORE).sum(1)
    assert len(batch) >= 4 and len(set(counts.tolist())) > 1
    loss_1, g_1 = grads(model, batch, len(batch))
    loss_m, g_m = grads(model, batch, 1)
    assert abs(loss_1 - loss_m) <= 1e-6
    for n in g_1:
        torch.testing.assert_close(g_1[n], g_m[n], atol=1e-6, rtol=0, msg=n)
    # what a per-micro-batch mean would give instead (the bug this guards against) is measurably different
    with torch.no_grad():
        naive = sum(float(torch.nn.functional.cross_entropy(
            packed_forward(model, batch.rows(i, i + 1)).logits[0], batch.targets[i], ignore_index=IGNORE))
            for i in range(len(batch))) / len(batch)
    assert abs(naive - loss_1) > 100 * 1e-6


def test_a_step_without_assistant_tokens_is_an_error(tok, examples):
    model = micro(tok.vocab_size)
    b = pack(examples[:2], 96, 0)
    empty = PackedBatch(b.inputs, torch.full_like(b.targets, IGNORE), b.positions, b.docs)
    with pytest.raises(ValueError, match="no loss target"):
        grads(model, empty, 1)


@pytest.fixture
def base_dir(tmp_path, tok):
    d = tmp_path / "base"
    save(micro(tok.vocab_size), tok, d)
    rows = [{"messages": [{"role": "user", "content": f"to be {'or not ' * (i % 3)}?"},
                          {"role": "assistant", "content": "that is" if i % 2 else "the question"}], "task": f"t{i % 2}"}
            for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_moegpt_finetune_runs_records_its_settings_and_resumes(tmp_path, base_dir, capsys):
    out = tmp_path / "tuned"
    args = ["finetune", "--model", str(base_dir), "--out", str(out), "--data", f"chats={tmp_path / 'chats.jsonl'}:2",
            "--seq-len", "48", "--batch-size", "4", "--micro-batch", "2", "--eval-every", "2", "--ckpt-every", "2",
            "--warmup-steps", "1", "--eval-max", "4", "--no-progress", "--peak-flops", "1e11"]
    assert main(args + ["--steps", "4", "--stop-at", "2"]) == 0
    with open(tmp_path / "chats.jsonl", "a") as f:  # the data edited since: refused too, then put back
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(SystemExit):
        main(args + ["--steps", "4", "--resume"])
    assert "conversations_sha256" in capsys.readouterr().err
    (tmp_path / "chats.jsonl").write_text("".join((tmp_path / "chats.jsonl").read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(SystemExit) as e:  # other settings than the run's: refused, naming them
        main(args + ["--steps", "4", "--resume", "--no-packing"])
    assert e.value.code == 2 and "fine-tuning settings differ (packing: True -> False)" in capsys.readouterr().err
    assert main(args + ["--steps", "4", "--resume"]) == 0
    whole = tmp_path / "whole"  # the same run unbroken: the same weights, bit for bit
    assert main([a if a != str(out) else str(whole) for a in args] + ["--steps", "4", "--no-eval"]) == 0
    resumed, unbroken = load(out).model.state_dict(), load(whole).model.state_dict()
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    settings = json.loads((out / "finetune.json").read_text())
    assert settings["packing"] is True and settings["base"] == str(base_dir.resolve())
    served = chat_format(load(out).tokenizer)  # what `moegpt serve --model OUT` renders chats with
    trained = chat_format(load(base_dir).tokenizer)
    chat = [{"role": "user", "content": "to be?"}]
    assert settings["chat_template"] == load(out).tokenizer.chat_template and served.render(chat) == trained.render(chat)
    report = json.loads((out / "finetune_eval.json").read_text())
    assert set(report["tuned"]["chats"]) == {"all", "t0", "t1"} and report["tuned"]["chats"]["all"]["n"] == 2  # 5% held out
    assert "exact match of greedy answers" in capsys.readouterr().out


def test_a_model_without_any_chat_template_is_refused_before_training(tmp_path, capsys):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(["to be or not to be"] * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    d = tmp_path / "plain"
    d.mkdir()
    save(micro(512), None, d)
    hf.save(str(d / "tokenizer.json"))
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", str(d), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has no chat template" in err and "--chat-template FILE" in err
    assert not (tmp_path / "o").exists()


def test_moegpt_finetune_refuses_bad_input_in_one_line(tmp_path, base_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for extra, message in (([f"--data", f"bad={bad}:1"], "bad.jsonl, line 1: no assistant message"),
                           (["--chat-template", str(tmp_path / "none.jinja")], "none.jinja does not exist"),
                           (["--lr", "-1"], "lr (-1.0) and grad_clip")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "--model", str(base_dir), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_help_shows_the_defaults_finetune_runs_with(capsys):
    """Fine-tuning fills its own defaults in (1,500 steps of 256 tokens...): the help names those, not
    pre-training's."""
    from moegpt.train.cli import CONTEXT_DEFAULTS, FINETUNE_DEFAULTS

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {FINETUNE_DEFAULTS['steps']}; with --context {CONTEXT_DEFAULTS['steps']})" in text
    assert f"(default: {FINETUNE_DEFAULTS['seq_len']}; with --context the extended length)" in text
    assert "(default: 0.003; with --context 0.001)" in text
