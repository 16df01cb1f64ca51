"""Serving images: requests/s of the engine with every image new vs one image repeated (its
cross-attention keys and values cached once, image_cache.py), beside the plain model decoding the
same requests with the images re-encoded and cross-attended from scratch at every token (what a
server without an image cache does: IDEFICS recomputes every step).

The ``tiny`` text model with the ``demo`` tower (96x96 pictures), random weights with the gates
open, 32 requests of a short chat prompt and one picture, 16 greedy tokens each, fp32.

    python -m bench.vision_serving [--requests 32] [--new 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import interleaved_medians, write_result
from moegpt.config import preset
from moegpt.data.chat import chat_format
from moegpt.data.tokenizer import IMAGE, Tokenizer
from moegpt.data.vision_data import image_marker
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model
from moegpt.model.vision.vision_model import add_vision
from moegpt.vision_config import TOWER_PRESETS, VisionConfig


def build():
    tok = Tokenizer.train(["Describe the shapes. Transcribe the text. to be or not to be\n" * 50], vocab_size=512)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size)
    model = add_vision(build_model(cfg, seed=0), VisionConfig.for_text(cfg, TOWER_PRESETS["demo"]))
    with torch.no_grad():
        for block in model.cross_attn.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return model.eval(), tok


@torch.no_grad()
def plain_without_cache(model, tok, prompt, pixels, new: int) -> None:
    """Every request's tokens decoded by the plain model, the picture encoded again at every token."""
    image_id = tok.token_to_id(IMAGE)
    for p in pixels:
        tokens = list(prompt)
        for _ in range(new):
            t = torch.tensor([tokens])
            tokens.append(int(model(t, images=model.images(p[None], t == image_id)).logits[0, -1].argmax()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tok = build()
    fmt = chat_format(tok)
    prompt = tok.encode(fmt.render([{"role": "user", "content": image_marker() + "Describe the shapes."}]))
    g = torch.Generator().manual_seed(0)
    distinct = [torch.randn(3, 96, 96, generator=g) for _ in range(args.requests)]
    repeated = [distinct[0]] * args.requests
    params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    stats = {}

    def engine_run(images, name):
        def run():
            engine = LLMEngine(model, EngineConfig(image_cache_blocks=args.requests), tokenizer=tok)
            engine.generate([prompt] * len(images), params, images=[[p] for p in images])
            stats[name] = {"images_encoded": engine.stats.images_encoded, "cache_hits": engine.stats.image_cache_hits}
        return run

    def encode_only():
        with torch.no_grad():
            for p in distinct:
                model.image_keys_values(model.encode_images(p[None]))

    fns = [engine_run(distinct, "distinct"), engine_run(repeated, "repeated"), encode_only,
           lambda: plain_without_cache(model, tok, prompt, distinct[:4], args.new)]
    t_distinct, t_repeated, t_encode, t_plain4 = interleaved_medians(fns, args.repeats)
    tokens = args.requests * args.new
    rows = {
        "engine, every image new": {"s": t_distinct, "requests_per_s": args.requests / t_distinct,
                                    "tokens_per_s": tokens / t_distinct, **stats["distinct"]},
        "engine, one image repeated": {"s": t_repeated, "requests_per_s": args.requests / t_repeated,
                                       "tokens_per_s": tokens / t_repeated, **stats["repeated"]},
        "encoding alone (tower, resampler, keys and values)": {"s": t_encode, "ms_per_image": 1e3 * t_encode / args.requests},
        "plain model, image recomputed every token (4 requests)": {
            "s": t_plain4, "requests_per_s": 4 / t_plain4, "tokens_per_s": 4 * args.new / t_plain4},
    }
    for name, row in rows.items():
        print(f"{name:58s} " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"saved {write_result('vision_serving', {'requests': args.requests, 'new_tokens': args.new, 'rows': rows})}")


if __name__ == "__main__":
    main()
