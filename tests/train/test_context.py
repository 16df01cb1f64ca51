"""Context extension: the passkey generator, plain-text rows among conversations, the extended
config, activation checkpointing, and `moegpt finetune --context` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moegpt.checkpoint.model_dir import load, save
from moegpt.cli import main
from moegpt.config import RopeType, preset
from moegpt.data.chat import chat_format
from moegpt.data.passkey import passkey_grid, passkey_source
from moegpt.data.sft import IGNORE, CorpusSet, build_sft_data, corpus_examples
from moegpt.data.dataset import load_tokens, split_blocks, tokenize_source
from moegpt.data.sources import Source
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.train.activations import SavedActivations, checkpoint_layers
from moegpt.train.finetune import extended_config

TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
        "What is the pass key? There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and remember it: I will ask you about it. The pass key is 12345. Remember it. 0123456789\n")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 50], vocab_size=400)


def count_with(tok):
    fmt = chat_format(tok)
    return lambda conv: len(fmt.tokens(tok, list(conv))[0])


def test_passkey_conversations_fill_their_length_and_hide_the_key_at_its_depth(tok):
    count = count_with(tok)
    convs, tasks = passkey_grid(count, [200, 400], [0.0, 0.5, 1.0], per_cell=3)
    assert len(convs) == 18 and tasks[0] == "200@0.00" and tasks[-1] == "400@1.00"
    for conv, task in zip(convs, tasks):
        length, depth = int(task.split("@")[0]), float(task.split("@")[1])
        n = count(conv)
        assert length - 40 < n <= length  # within one filler sentence of the length
        text, key = conv[0]["content"], conv[1]["content"]
        assert key.startswith("The pass key is ") and key in text and len(key) == len("The pass key is 12345.")
        from moegpt.data.passkey import FILLER

        cut = text.index("The pass key is")
        before, total = text[:cut].count(FILLER), text.count(FILLER)
        assert abs(before / max(total, 1) - depth) < 0.25
    source = passkey_source(1.0, count, 300, n_train=200, n_val=20)
    lengths = [count(c) for c in source.train]
    assert max(lengths) <= 300 and min(lengths) < 120 < 250 < max(lengths)  # spread up to the row
    assert {c[1]["content"] for c in source.val}.isdisjoint({c[1]["content"] for c in source.train[:20]})
    again = passkey_source(1.0, count, 300, n_train=200, n_val=20)
    assert again.train == source.train  # deterministic
    # a context extension's: from about the original context (within one filler sentence) to the row
    longer = passkey_source(1.0, count, 300, min_tokens=150, n_train=200, n_val=20)
    lengths = [count(c) for c in longer.train + longer.val]
    assert 150 - 40 < min(lengths) <= 150 < 250 < max(lengths) <= 300


def test_plain_text_rows_are_the_corpus_blocks_with_every_token_a_target(tmp_path, tok):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT * 30)
    corpus = CorpusSet(name="notes", epochs=1.0, source=Source(name="notes", epochs=1.0, paths=(f,)))
    data = build_sft_data([corpus], tok, chat_format(tok), 64, cache_dir=tmp_path, val_fraction=0.1)
    tokens = load_tokens(tokenize_source(corpus.source, tok, tmp_path))
    (train_start, n_train), (val_start, n_val) = split_blocks(len(tokens), 64, 0.1)
    rows = data.train[0]
    assert len(rows) == n_train and len(data.val[0]) == n_val
    assert (rows.targets != IGNORE).all() and (rows.positions[0] == torch.arange(64)).all()
    assert rows.inputs[1].tolist() == tokens[64:128].tolist() and rows.targets[1].tolist() == tokens[65:129].tolist()
    train, val = corpus_examples(corpus, tok, 64, tmp_path, 0.1)
    assert val[0][0] == tokens[val_start:val_start + 65].tolist()


def test_copy_rows_repeat_each_span_of_the_corpus_and_learn_the_second_copy(tmp_path, tok):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT * 30)
    source = Source(name="copy", epochs=1.0, paths=(f,))
    tokens = load_tokens(tokenize_source(source, tok, tmp_path)).tolist()
    (_, n_train), (val_start, n_val) = split_blocks(len(tokens), 16, 0.1)
    fixed = CorpusSet(name="copy", epochs=1.0, source=source, repeat_span=16)
    data = build_sft_data([fixed], tok, chat_format(tok), 64, cache_dir=tmp_path, val_fraction=0.1)
    rows = data.train[0]
    assert len(rows) == -(-n_train // 2) and len(data.val[0]) == -(-n_val // 2)  # two 31-entry examples a row
    span = tokens[16:32]  # the second example, in the first row's second half
    assert rows.inputs[0, 31:62].tolist() == (span + span)[:-1]
    assert rows.targets[0, 31:46].tolist() == [IGNORE] * 15 and rows.targets[0, 46:62].tolist() == span  # the copy
    assert rows.positions[0, 31:62].tolist() == list(range(31)) and (rows.docs[0, 31:62] == 1).all()
    assert (rows.targets[0, 62:] == IGNORE).all()  # padding
    _, val = corpus_examples(fixed, tok, 64, tmp_path, 0.1)
    assert val[0][0] == tokens[val_start:val_start + 16] * 2

    with pytest.raises(ValueError, match="needs rows of at least 31 tokens"):
        corpus_examples(fixed, tok, 20, tmp_path, 0.1)
    with pytest.raises(ValueError, match="repeat_span 0 must be >= 1"):
        CorpusSet(name="copy", epochs=1.0, source=source, repeat_span=0)


def test_the_extended_config_scales_rope_by_the_context_factor():
    cfg = preset("tiny").replace(max_seq_len=128)
    four = extended_config(cfg, "4x", "yarn")
    assert four.max_seq_len == 512 and four.rope_scaling.type == RopeType.YARN
    assert four.rope_scaling.factor == 4.0 and four.rope_scaling.original_max_seq_len == 128
    assert extended_config(cfg, "1000", "dynamic").rope_scaling.factor == 1000 / 128
    for spec, message in (("1x", "not longer than the model's context"), ("100", "not longer"),
                          ("abc", "want a factor such as 4x"), ("0.5x", "not longer")):
        with pytest.raises(ValueError, match=message):
            extended_config(cfg, spec, "linear")
    with pytest.raises(ValueError, match="already has yarn rope scaling"):
        extended_config(four, "2x", "yarn")


def test_activation_checkpointing_keeps_less_and_computes_the_same_gradients():
    cfg = preset("tiny").replace(vocab_size=300, n_layers=3, d_model=64, n_heads=4, d_ff=64, n_experts=4, max_seq_len=256)
    tokens = torch.randint(0, 300, (2, 257), generator=torch.Generator().manual_seed(0))
    grads, kept = {}, {}
    for on in (False, True):
        model = build_model(cfg, seed=1)
        if on:
            checkpoint_layers(model)
        with SavedActivations(model) as saved:
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss
            loss.backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters()}
        kept[on] = saved.bytes
        assert set(model.state_dict()) == set(build_model(cfg, device="meta").state_dict())  # names unchanged
    assert all(torch.equal(grads[False][n], grads[True][n]) for n in grads[False])
    assert kept[True] < 0.5 * kept[False]


@pytest.fixture
def base_dir(tmp_path, tok):
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=128)
    d = tmp_path / "base"
    save(build_model(cfg, seed=0), tok, d)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    return d


def _other_model(base_dir, directory, **changes):
    """A model directory beside ``base_dir``: its config with ``changes``, other weights."""
    base = load(base_dir)
    save(build_model(base.model.cfg.replace(**changes), seed=1), base.tokenizer, directory)
    return directory


def test_moegpt_finetune_context_extends_the_model_and_reports_passkey_and_perplexity(tmp_path, base_dir, capsys):
    out = tmp_path / "long"
    pretrained = _other_model(base_dir, tmp_path / "pretrained")  # --model tuned from it, say
    args = ["finetune", "--model", str(base_dir), "--out", str(out), "--context", "2x", "--rope-scaling", "linear",
            "--reference", str(pretrained),
            "--data", f"passkey:1,notes={tmp_path / 'corpus.txt'}:1", "--steps", "2", "--batch-size", "2",
            "--micro-batch", "1", "--eval-every", "2", "--ckpt-every", "2", "--warmup-steps", "1", "--no-progress",
            "--peak-flops", "1e11", "--passkey-per-cell", "1", "--activation-checkpointing", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    tuned = load(out).model.cfg
    assert tuned.max_seq_len == 256 and tuned.rope_scaling.type == RopeType.LINEAR
    assert tuned.rope_scaling.factor == 2.0 and tuned.rope_scaling.original_max_seq_len == 128
    hf = json.loads((out / "config.json").read_text())
    assert hf["rope_parameters"]["rope_type"] == "linear" and hf["max_position_embeddings"] == 256
    settings = json.loads((out / "finetune.json").read_text())
    assert settings["context"] == 256 and settings["rope_scaling"]["type"] == "linear"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["activation_mib"] > 0 and r["peak_rss_mib"] > 0 for r in rows if "loss" in r)
    report = json.loads((out / "context_eval.json").read_text())
    assert report["lengths"] == [64, 128, 256] and report["original_context"] == 128
    assert set(report["before"]["passkey"]) == {"all"} | {f"{n}@{d:.2f}" for n in (64, 128, 256)
                                                         for d in (0, 0.25, 0.5, 0.75, 1)}
    assert len(report["after"]["perplexity_by_position"]) == 256 // 32
    # the text perplexity is compared with the reference's (another model: not the base's)
    assert report["reference_model"] == str(pretrained)
    ppl = {k: report[k]["perplexity_below_original"] for k in ("reference", "before", "after")}
    assert ppl["reference"] != ppl["before"]
    assert report["perplexity_below_original_ratio"] == pytest.approx(ppl["after"] / ppl["reference"])
    assert (out / "context_ppl.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "passkey retrieval" in printed and "perplexity at positions < 128 (the reference" in printed
    assert "data passkey x1, notes x1" in printed
    with pytest.raises(SystemExit):  # a resume with another scaling is refused, naming it
        main(args + ["--resume", "--steps", "3"] + ["--rope-scaling", "yarn"])
    assert "rope_scaling" in capsys.readouterr().err


def test_a_reference_unlike_the_base_or_without_context_is_a_one_line_error(tmp_path, base_dir, capsys):
    longer = _other_model(base_dir, tmp_path / "longer", max_seq_len=256)
    wider = _other_model(base_dir, tmp_path / "wider", d_model=128)
    for extra, message in ((["--context", "2x", "--reference", str(longer)], "has max_seq_len 256; --model has 128"),
                           (["--context", "2x", "--reference", str(wider)], "has d_model 128; --model has 64"),
                           (["--context", "2x", "--reference", str(tmp_path / "none")], "is not a model directory"),
                           (["--reference", str(base_dir)], "give --context too")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "--model", str(base_dir), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_measuring_saved_activations_leaves_no_reference_cycle():
    """A pack hook that returned a saved output itself would tie it to its own grad_fn: a branch the
    backward never reaches (the forward computes more than the loss needs) then stays alive until the
    garbage collector runs (memory grew every step)."""
    import gc
    import weakref

    x = torch.randn(1000, requires_grad=True)
    gc.disable()
    try:
        with SavedActivations(torch.nn.Linear(1, 1)) as saved:
            unused = x.exp()  # exp saves its output for a backward that never comes
        ref = weakref.ref(unused)
        del unused
        assert ref() is None and saved.bytes == 4000
    finally:
        gc.enable()


def test_exact_match_answers_in_what_is_left_of_the_context(tok):
    """Prompts near or past the end of the context are scored (wrong when no answer fits), not refused."""
    from moegpt.infer.chat_eval import exact_match

    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=128)
    model = build_model(cfg, seed=0).eval()
    fmt = chat_format(tok)
    convs = [({"role": "user", "content": "The sky turns blue. " * n}, {"role": "assistant", "content": "x"})
             for n in (1, 10, 40)]
    lengths = [len(tok.encode(fmt.render([c[0]], add_generation_prompt=True))) for c in convs]
    assert lengths[0] < 100 < lengths[1] < 128 < lengths[2]
    scores = exact_match(model, tok, fmt, convs, ["a", "b", "c"], max_tokens=32)
    assert scores["all"]["n"] == 3 and scores["c"]["correct"] == 0
