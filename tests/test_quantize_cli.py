"""``moegpt quantize`` end to end: a directory written only past the quality gates, which the engine
then serves, its greedy tokens those of the quantized model's own forward."""

import json

import pytest
import torch

from moegpt.cli import main
from moegpt.checkpoint.model_dir import load
from moegpt.infer.llm import LLM
from moegpt.infer.sampling_params import SamplingParams
from moegpt.quant.model import is_quantized, model_scheme
from tests.serve.conftest import make_model_dir



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("scheme,embedding", [("int8", False), ("int4", False), ("int4", True)])
def test_a_quantized_directory_is_written_reported_and_served(base, cache, tmp_path, capsys, scheme, embedding):
    out = tmp_path / scheme
    assert main(["quantize", "--model", str(base), "--out", str(out), "--scheme", scheme, "--cache-dir", str(cache),
                 "--eval-sequences", "8", "--min-top1-agreement", "0", "--max-perplexity-increase", "1000"]
                + ["--quantize-embedding"] * embedding) == 0
    printed = capsys.readouterr().out
    assert f"{scheme}" in printed and "top-1 agreement" in printed
    report = json.loads((out / "quantize.json").read_text())
    assert report["tokens"] > 0 and report["weight_bytes"] < 0.45 * report["full_precision_weight_bytes"]
    assert report["embedding_quantized"] == embedding
    model, tok = load(out)
    assert model_scheme(model).bits == int(scheme[-1]) and is_quantized(model.embed, "weight") == embedding
    prompt = tok.encode("to be, or not", add_special_tokens=True)
    got = LLM(out).generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].token_ids
    ids = list(prompt)
    with torch.no_grad():  # the quantized model's own forward, token by token without a cache
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert list(got) == ids[len(prompt):]


def test_a_missed_gate_exits_2_naming_the_numbers_and_writes_nothing(base, cache, tmp_path, capsys):
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", str(base), "--out", str(out), "--scheme", "int4", "--cache-dir", str(cache),
              "--eval-sequences", "8", "--min-top1-agreement", "1.01"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "int4-g32 failed its quality gates, nothing written: top-1 agreement" in err
    assert not out.exists()


def test_an_fp8_embedding_table_is_refused_in_one_line(base, cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", str(base), "--out", str(tmp_path / "q"), "--scheme", "fp8", "--quantize-embedding",
              "--cache-dir", str(cache)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "quantize the embedding table as int8 or int4" in err and not (tmp_path / "q").exists()


def test_quantizing_a_quantized_directory_is_refused(base, cache, tmp_path, capsys):
    once = tmp_path / "once"
    assert main(["quantize", "--model", str(base), "--out", str(once), "--scheme", "int8", "--cache-dir", str(cache),
                 "--eval-sequences", "4", "--min-top1-agreement", "0", "--max-perplexity-increase", "100"]) == 0
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(once), "--out", str(tmp_path / "twice"), "--scheme", "int8"])
    assert "is quantized already" in capsys.readouterr().err
