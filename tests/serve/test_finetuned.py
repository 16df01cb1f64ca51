"""A fine-tuned directory served: `moegpt serve` renders a chat as fine-tuning rendered it and stops
at the end-of-turn token it was trained to write."""

import json

import httpx

from moegpt.checkpoint.model_dir import load
from moegpt.cli import main
from moegpt.data.chat import chat_format
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from tests.serve.conftest import make_model_dir, start_server, stop, wait_ready


def test_a_finetuned_directory_answers_chats_in_the_trained_format(tmp_path):
    base = make_model_dir(tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": "to be?"}, {"role": "assistant", "content": "not to be"}]}] * 40
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tuned = tmp_path / "tuned"
    assert main(["finetune", "--model", str(base), "--out", str(tuned), "--data", f"chats={tmp_path / 'chats.jsonl'}:4",
                 "--steps", "30", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "4", "--lr", "1e-2",
                 "--warmup-steps", "1", "--eval-every", "30", "--ckpt-every", "30", "--no-progress", "--no-eval",
                 "--peak-flops", "1e11"]) == 0
    chat = [{"role": "user", "content": "to be?"}]
    model, tok = load(tuned)
    fmt = chat_format(tok)
    prompt = tok.encode(fmt.render(chat))  # the rendering fine-tuning trained on, up to the answer
    engine = LLMEngine(model, EngineConfig(), tok)
    want = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                    stop_token_ids=sorted(fmt.stop_token_ids)))[0].outputs[0]
    assert want.text == "not to be" and want.finish_reason == "stop"  # learned, and ended its turn
    server = start_server(tuned)
    try:
        wait_ready(server)
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                       json={"model": server.model, "messages": chat, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == want.text and body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["prompt_tokens"] == len(prompt)
    finally:
        stop(server)
