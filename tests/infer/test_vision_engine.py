"""A vision model through the engine: greedy tokens equal the plain model's forward, token for token,
with text-only and image requests in one continuous batch, under preemption, prefix caching (the same
tokens beside another picture share nothing) and aborts; a repeated image is encoded once; every KV
and image block is free at the end; bad image requests are one-line errors."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import preset
from moegpt.data.tokenizer import IMAGE, Tokenizer
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model
from moegpt.model.vision.vision_model import add_vision
from moegpt.vision_config import TOWER_PRESETS, VisionConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["to be or not to be, that is the question of kings and queens\n" * 40], vocab_size=300)


def _model(tok, dtype=torch.float32):
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=3, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=256)
    vcfg = VisionConfig.for_text(cfg, TOWER_PRESETS["tiny"], n_latents=8, cross_attention_every=2)
    model = add_vision(build_model(cfg, seed=0), vcfg, seed=1)
    with torch.no_grad():  # open the gates: the images change what comes out
        for block in model.cross_attn.values():
            block.attn_gate.fill_(1.5)
            block.ff_gate.fill_(0.7)
    return model.to(dtype).eval()


def _pixels(seed: int) -> torch.Tensor:
    return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _prompt(tok, images: int, text: str = "to be or not") -> list[int]:
    return tok.encode(IMAGE + " " + text + (" " + IMAGE + " kings") * (images - 1)) if images else tok.encode(text)


@torch.no_grad()
def _plain_greedy(model, tok, prompt: list[int], images: list[torch.Tensor], n: int) -> list[int]:
    """The oracle: the whole sequence through the plain model's forward for every token."""
    tokens, image_id = list(prompt), tok.token_to_id(IMAGE)
    for _ in range(n):
        t = torch.tensor([tokens])
        ctx = model.images(torch.stack(images), t == image_id) if images else None
        tokens.append(int(model(t, images=ctx).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def _requests(tok):
    return [(_prompt(tok, 1), [_pixels(1)]), (_prompt(tok, 0), []), (_prompt(tok, 2), [_pixels(2), _pixels(3)]),
            (_prompt(tok, 1), [_pixels(4)]), (_prompt(tok, 1, "that is the question"), [_pixels(1)])]


@pytest.mark.parametrize("num_kv_blocks", [None, 6], ids=["roomy", "preempting"])
def test_engine_greedy_equals_the_plain_model_with_text_and_images_in_one_batch(tok, num_kv_blocks):
    model = _model(tok)
    reqs = _requests(tok)
    expected = [_plain_greedy(model, tok, p, im, GREEDY.max_tokens) for p, im in reqs]
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=num_kv_blocks), tokenizer=tok)
    outs = engine.generate([p for p, _ in reqs], GREEDY, images=[im for _, im in reqs])
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    if num_kv_blocks is not None:
        assert engine.stats.preemptions > 0
    # image 1 is shown twice: encoded once; 4 distinct images in all
    assert engine.stats.images_encoded == 4 and engine.stats.image_cache_hits == 1
    assert engine.stats.kv_blocks_free == engine.stats.kv_blocks_total and engine.stats.image_blocks_used == 0


def test_the_same_tokens_beside_another_picture_share_no_cached_prefix(tok):
    model = _model(tok)
    prompt = _prompt(tok, 1, "to be or not to be that is the question of kings")
    engine = LLMEngine(model, EngineConfig(block_size=4), tokenizer=tok)
    for seed in (5, 6):  # one after the other: the first one's blocks are cached by then
        out = engine.generate([prompt], GREEDY, images=[[_pixels(seed)]])[0]
        assert list(out.outputs[0].token_ids) == _plain_greedy(model, tok, prompt, [_pixels(seed)], GREEDY.max_tokens)
    again = engine.generate([prompt], GREEDY, images=[[_pixels(5)]])[0]  # the same picture: its prefix is reused
    assert list(again.outputs[0].token_ids) == _plain_greedy(model, tok, prompt, [_pixels(5)], GREEDY.max_tokens)
    assert engine.stats.image_cache_hits == 1


def test_aborted_and_finished_requests_free_every_block(tok):
    model = _model(tok)
    engine = LLMEngine(model, EngineConfig(block_size=4, image_cache_blocks=3), tokenizer=tok)
    rids = [engine.add_request(_prompt(tok, 1), SamplingParams(max_tokens=20, ignore_eos=True, seed=i),
                               [_pixels(10 + i)]) for i in range(3)]
    engine.step()
    engine.step()
    assert engine.stats.image_blocks_used == 3
    with pytest.raises(Exception, match="all 3 image cache blocks are in use"):
        engine.add_request(_prompt(tok, 1), GREEDY, [_pixels(99)])
    engine.abort(rids[1])
    while engine.has_work:
        engine.step()
    assert engine.stats.kv_blocks_free == engine.stats.kv_blocks_total and engine.stats.image_blocks_used == 0
    engine.add_request(_prompt(tok, 1), GREEDY, [_pixels(99)])  # room again
    while engine.has_work:
        engine.step()


def test_bad_image_requests_are_one_line_errors(tok):
    engine = LLMEngine(_model(tok), EngineConfig(block_size=4), tokenizer=tok)
    with pytest.raises(ValueError, match="the prompt has 1 image tokens .* but 2 images"):
        engine.add_request(_prompt(tok, 1), GREEDY, [_pixels(1), _pixels(2)])
    with pytest.raises(ValueError, match=r"pixel values of shape \(1, 3, 32, 32\)"):
        engine.add_request(_prompt(tok, 1), GREEDY, [torch.zeros(3, 32, 32)])
    text_only = LLMEngine(build_model(preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, n_layers=2,
                                                             n_heads=4, d_ff=64, n_experts=4)), tokenizer=tok)
    with pytest.raises(ValueError, match="this model has no vision part: it takes no images"):
        text_only.add_request(_prompt(tok, 1), GREEDY, [_pixels(1)])
    assert engine.stats.image_blocks_used == 0
