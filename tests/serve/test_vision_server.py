"""Images through the OpenAI chat API: data-URL PNG and JPEG content parts answered as the offline
engine answers them, a repeated image encoded once (/metrics), and bad images refused with an OpenAI
error body (400, or 413 past the size limits); a text-only model given an image answers 400."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image

from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.data.chat import chat_format
from moegpt.data.tokenizer import Tokenizer
from moegpt.data.vision_data import image_marker
from moegpt.infer.llm import LLM
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model
from moegpt.model.vision.vision_model import add_vision
from moegpt.vision_config import TOWER_PRESETS, VisionConfig
from tests.serve.conftest import TEXT, start_server, stop, wait_ready


def _picture(seed: int, fmt: str = "PNG", size=(80, 70)) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _message(*urls: str, text: str = "to be?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vision-serve") / "model"
    tok = Tokenizer.train([TEXT], vocab_size=300)
    cfg = preset("tiny").replace(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_ff=64, n_experts=4,
                                 max_seq_len=256)
    model = add_vision(build_model(cfg, seed=0), VisionConfig.for_text(cfg, TOWER_PRESETS["tiny"], n_latents=8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # sharp logits, and open gates: the pictures decide the answer
        for block in model.cross_attn.values():
            block.attn_gate.fill_(2.0)
            block.ff_gate.fill_(1.0)
    save(model, tok, directory)
    server = start_server(directory)
    try:
        wait_ready(server)
        yield server, directory
    finally:
        stop(server)


def _chat(server, messages, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": server.model, "messages": messages, "max_tokens": 8, "temperature": 0, **extra})


def test_image_chats_answer_as_the_offline_engine_and_a_repeated_image_is_encoded_once(vision_server):
    server, directory = vision_server
    png, jpeg = _picture(1), _picture(2, "JPEG")
    llm = LLM(directory)
    fmt = chat_format(llm.tokenizer)
    for urls, images in [([_url(png)], [png]), ([_url(jpeg, "image/jpeg")], [jpeg]),
                         ([_url(png), _url(jpeg, "image/jpeg")], [png, jpeg])]:
        r = _chat(server, _message(*urls))
        assert r.status_code == 200, r.text
        text = fmt.render([{"role": "user", "content": image_marker() * len(images) + "to be?"}])
        offline = llm.generate({"prompt_token_ids": llm.tokenizer.encode(text),  # as the server tokenizes a chat
                                "multi_modal_data": {"image": [Image.open(io.BytesIO(b)) for b in images]}},
                               SamplingParams(temperature=0, max_tokens=8, stop_token_ids=sorted(fmt.stop_token_ids)))
        assert r.json()["choices"][0]["message"]["content"] == offline[0].outputs[0].text
    m = server.wait_idle()
    assert m["moegpt:images_encoded_total"] == 2 and m["moegpt:image_cache_hits_total"] == 2  # png and jpeg, twice
    assert m["moegpt:image_cache_blocks_used"] == 0 and m["moegpt:image_cache_blocks_total"] > 0


@pytest.mark.parametrize("urls,status,message", [
    (["https://example.com/cat.png"], 400, "only data URLs"),
    (["data:image/png;base64,!!!not base64"], 400, "not valid base64"),
    (["data:image/png,rawbytes"], 400, "must be base64-encoded"),
    ([_url(b"GIF89a" + bytes(40), "image/gif")], 400, "image 0 is not a readable image"),
    ([_url(_picture(3)[:-30])], 400, "image 0 is truncated or corrupt"),
    ([_url(_picture(4))] * 9, 400, "9 images in one request; the model takes at most 8"),
], ids=["http", "base64", "not-base64", "gif", "truncated", "too-many"])
def test_bad_images_get_an_openai_error(vision_server, urls, status, message):
    server, _ = vision_server
    r = _chat(server, _message(*urls))
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_an_image_over_the_pixel_limit_is_413(vision_server):
    server, _ = vision_server
    buffer = io.BytesIO()
    Image.new("RGB", (4100, 4100), (10, 20, 30)).save(buffer, format="PNG")
    r = _chat(server, _message(_url(buffer.getvalue())))
    assert r.status_code == 413 and "over the 16777216-pixel limit" in r.json()["error"]["message"]


def test_a_text_only_model_given_an_image_is_400(server):
    r = _chat(server, _message(_url(_picture(5))))
    assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
