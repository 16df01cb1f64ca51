"""moegpt's own save/load round trip, with its tokenizer."""

import pytest
import torch

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import preset
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model

TEXT = "To be, or not to be, that is the question. def f(x): return x + 1\n" * 200


def test_round_trip_keeps_weights_tokenizer_and_special_ids(tmp_path):
    tok = Tokenizer.train([TEXT], vocab_size=320)
    model = build_model(preset("tiny").replace(vocab_size=320, n_layers=1), seed=7)
    save(model, tok, tmp_path)
    loaded, tok2 = load(tmp_path)
    assert tok2.encode("not to be") == tok.encode("not to be")
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
    tok = Tokenizer.train([TEXT], vocab_size=400)
    model = build_model(preset("tiny").replace(vocab_size=320, n_layers=1))
    with pytest.raises(ValueError, match=r"tokenizer vocab \(400\) exceeds model vocab_size \(320\)"):
        save(model, tok, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_directory_with_only_a_sentencepiece_model_loads_and_generates(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    import json

    from moegpt import LLM, SamplingParams

    (tmp_path / "corpus.txt").write_text(TEXT + "héllo 你好\n" * 20)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, hard_vocab_limit=False, byte_fallback=True, model_type="bpe",
                                   minloglevel=2)
    directory = tmp_path / "model"
    save(build_model(preset("tiny").replace(vocab_size=320, n_layers=1), seed=0), None, directory)
    (directory / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    _, tok = load(directory)
    assert tok is not None and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("to be", add_special_tokens=True)[0] == tok.bos_id
    [output] = LLM(directory).generate(["to be"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(output.outputs[0].token_ids) == 3
