"""Special tokens and sentencepiece directories as transformers has them: `encode(add_special_tokens=True)`
gives AutoTokenizer's input_ids; a directory with only a sentencepiece tokenizer.model loads with
AutoTokenizer's ids and text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from moegpt.data import Tokenizer

SAMPLES = ["to be", " to  be\n", "héllo wörld 你好 🤗!", "", "a\tb  ", "<s> inside </s>", "unseen: Ωμέγα ∑ 𝄞"]


def autotokenizer(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


# ---------------------------------------------------------------------------------- BOS/EOS rules
BOS_TEMPLATE = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                             special_tokens=[("<|bos|>", 0)])
EOS_TEMPLATE = processors.TemplateProcessing(single="$A <|eos|>", special_tokens=[("<|eos|>", 1)])
RULES = [
    # (name, post-processor in tokenizer.json, tokenizer_config.json extras, BOS expected, EOS expected)
    ("no post-processor", None, {}, False, False),
    # transformers 5 ignores add_bos_token / add_eos_token when there is a tokenizer.json
    ("no post-processor, add_bos_token", None, {"add_bos_token": True}, False, False),
    ("bos template", BOS_TEMPLATE, {}, True, False),
    ("bos template, add_bos_token false", BOS_TEMPLATE, {"add_bos_token": False}, True, False),
    ("eos template", EOS_TEMPLATE, {}, False, True),
    ("byte-level post-processor, add_bos_token", processors.ByteLevel(trim_offsets=False), {"add_bos_token": True},
     False, False),
]


@pytest.mark.parametrize("name,post,extra,bos,eos", RULES, ids=[r[0] for r in RULES])
def test_special_tokens_follow_the_tokenizer_as_autotokenizer(tokenizer, tmp_path, name, post, extra, bos, eos):
    tokenizer.save(tmp_path)
    if post is not None:
        hf = HFTokenizer.from_str(tokenizer.to_json())
        hf.post_processor = post
        (tmp_path / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    config_path = tmp_path / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **extra}), encoding="utf-8")
    ours, theirs = Tokenizer.load(tmp_path), autotokenizer(tmp_path)
    for text in SAMPLES:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text)["input_ids"], text
        plain = ours.encode(text)
        assert ids == [0] * bos + plain + [1] * eos
        assert plain == theirs(text, add_special_tokens=False)["input_ids"]


def test_two_bos_rules_at_once_are_refused(tokenizer):
    with pytest.raises(ValueError, match="add_bos"):
        tokenizer.encode("x", add_special_tokens=True, add_bos=True)


# ---------------------------------------------------------------------------------- sentencepiece
CORPUS = ("to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 40
          + "héllo wörld, ça va? 你好世界 naïve café\n" * 10)


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory) -> dict[str, Path]:
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    out = {}
    for kind in ("bpe", "unigram"):
        spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / kind),
                                       vocab_size=360, hard_vocab_limit=False, model_type=kind, byte_fallback=True,
                                       character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                       minloglevel=2)
        out[kind] = root / f"{kind}.model"
    return out


SP_DIRS = [
    # (name, model kind, tokenizer_config.json or None)
    ("bpe, no tokenizer_config", "bpe", None),
    ("bpe, add_bos_token", "bpe", {"add_bos_token": True}),
    ("bpe, add_bos_token, not legacy", "bpe", {"add_bos_token": True, "legacy": False}),
    ("bpe, add_eos_token only", "bpe", {"add_bos_token": False, "add_eos_token": True}),
    ("bpe, Llama class", "bpe", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": True}),
    ("unigram, add_bos_token", "unigram", {"add_bos_token": True}),
]


def sp_dir(root: Path, model: Path, config: dict | None) -> Path:
    root.mkdir()
    shutil.copy(model, root / "tokenizer.model")
    (root / "config.json").write_text(json.dumps({"model_type": "mixtral"}))  # as in a Mixtral directory
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("name,kind,config", SP_DIRS, ids=[d[0] for d in SP_DIRS])
def test_sentencepiece_only_directory_loads_as_autotokenizer_has_it(sp_models, tmp_path, name, kind, config):
    directory = sp_dir(tmp_path / "model", sp_models[kind], config)
    ours, theirs = Tokenizer.load(directory), autotokenizer(directory)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (theirs.bos_token_id, theirs.eos_token_id, len(theirs))
    for text in SAMPLES:
        for specials in (True, False):
            ids = ours.encode(text, add_special_tokens=specials)
            assert ids == theirs(text, add_special_tokens=specials)["input_ids"], (text, specials)
        for skip in (True, False):
            assert ours.decode(ids, skip_special=skip) == theirs.decode(ids, skip_special_tokens=skip), text


def test_sentencepiece_conversion_encodes_as_sentencepiece_itself(sp_models, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    for kind, model in sp_models.items():
        ours = Tokenizer.load(sp_dir(tmp_path / kind, model, None))
        sp = spm.SentencePieceProcessor(model_file=str(model))
        for text in SAMPLES:
            if "<s>" not in text:  # sentencepiece reads "<s>" as text; transformers (and we) as the token
                assert ours.encode(text) == sp.encode(text), (kind, text)
                assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)), (kind, text)


def test_bos_rule_of_a_sentencepiece_directory_comes_from_its_config(sp_models, tmp_path):
    plain = Tokenizer.load(sp_dir(tmp_path / "plain", sp_models["bpe"], None))
    with_bos = Tokenizer.load(sp_dir(tmp_path / "bos", sp_models["bpe"], {"add_bos_token": True}))
    assert plain.encode("to be", add_special_tokens=True) == plain.encode("to be")
    assert with_bos.encode("to be", add_special_tokens=True) == [with_bos.bos_id, *plain.encode("to be")]
    assert with_bos.fingerprint != plain.fingerprint  # different prompts: not interchangeable as a draft's


def test_a_tokenizer_model_that_is_not_sentencepiece_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # a tiktoken vocabulary, not a ModelProto
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.load(tmp_path)
