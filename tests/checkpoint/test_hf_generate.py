"""Greedy generation equals transformers' greedy generate on the same directory."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF parity needs the dev extra (transformers)")

from moegpt.checkpoint.model_dir import load, save  # noqa: E402
from moegpt.config import PRESETS  # noqa: E402
from moegpt.infer.generate import generate  # noqa: E402
from moegpt.model import build_model  # noqa: E402


def test_greedy_generation_matches_transformers_token_for_token(tmp_path):
    cfg = PRESETS["tiny"].replace(vocab_size=307, n_layers=2, d_model=64, n_heads=4, d_ff=96, n_experts=8)
    model = build_model(cfg, seed=5)
    with torch.no_grad():  # larger weights than init so greedy paths are not all one token
        for p in model.parameters():
            p.mul_(8.0)
    save(model, None, tmp_path)
    ours, _ = load(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 307, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, prompt, max_new_tokens=24)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 7:].tolist())) > 3  # a non-trivial continuation
