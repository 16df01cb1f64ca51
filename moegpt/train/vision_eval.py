"""Does the vision model see? Greedy answers on held-out generated pictures, scored per task:
character accuracy of transcriptions, and count / colour / shape / position accuracy of scene
descriptions. The control shuffles the images across the batch (each question gets another
picture): a model that reads the image falls to chance there, one that guesses from the prompt does not.

Legend: B examples, T tokens so far, L latents, Dv latent width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.data.image_gen import Scene, character_accuracy
from moegpt.data.images import preprocess
from moegpt.data.vision_data import VisionData, conversation
from moegpt.model.vision.cross_attention import ImageContext
from moegpt.model.vision.vision_model import VisionMoEGPT


@dataclass(frozen=True)
class Answers:
    source: str
    kind: str
    prompts: list[str]
    truths: list[str]
    predictions: list[str]


@torch.no_grad()
def greedy_answers(model: VisionMoEGPT, data: VisionData, source: int, n: int, *, shuffle: bool = False,
                   max_new_tokens: int = 48, batch_size: int = 100) -> Answers:
    """The model's greedy answer to each of the first ``n`` held-out examples of ``source``
    (``shuffle``: each answered with the next example's picture instead)."""
    src = data.sources[source]
    was_training = model.training
    model.eval()
    truths, predictions, prompts = [], [], []
    stops = set(data.chat.stop_token_ids) | ({data.tokenizer.eos_id} if data.tokenizer.eos_id is not None else set())
    device = next(model.parameters()).device
    n = min(n, src.val_size)
    for first in range(0, n, batch_size):
        examples = [src.example("val", i, data.seed, data.image_size) for i in range(first, min(n, first + batch_size))]
        prompt_ids = [data.tokenizer.encode(data.chat.render(conversation(p), add_generation_prompt=True))
                      for _, p, _ in examples]
        if len({len(p) for p in prompt_ids}) != 1:
            raise ValueError(f"source {src.name!r}: held-out prompts of different lengths")
        pixels = preprocess([image for image, _, _ in examples], data.processing).to(device)
        latents = model.encode_images(pixels)  # (B, L, Dv), once per image
        if shuffle:
            latents = latents.roll(1, dims=0)
        tokens = torch.tensor(prompt_ids, device=device)  # (B, T)
        done = torch.zeros(len(examples), dtype=torch.bool, device=device)
        out = [[] for _ in examples]
        for _ in range(max_new_tokens):
            images = ImageContext.from_locations(latents, tokens == data.image_token)
            nxt = model(tokens, images=images).logits[:, -1].argmax(-1)  # (B,)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t in stops:
                        done[b] = True
                    else:
                        out[b].append(t)
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        predictions += [data.tokenizer.decode(ids).strip() for ids in out]
        truths += [answer for _, _, answer in examples]
        prompts += [prompt for _, prompt, _ in examples]
    model.train(was_training)
    return Answers(src.name, src.kind, prompts, truths, predictions)


def scores(answers: Answers) -> dict[str, float]:
    """Per task: transcriptions' character accuracy and exact match; scenes' accuracy per field."""
    if answers.kind == "screenshots":
        exact = sum(p == t for p, t in zip(answers.predictions, answers.truths)) / max(1, len(answers.truths))
        return {"character_accuracy": character_accuracy(answers.predictions, answers.truths), "exact_match": exact}
    fields = ("count", "colour", "shape", "position")
    hits = dict.fromkeys(fields, 0)
    for p, t in zip(answers.predictions, answers.truths):
        got, truth = Scene.parse(p), Scene.parse(t)
        for f in fields:
            hits[f] += got is not None and getattr(got, f) == getattr(truth, f)
    n = max(1, len(answers.truths))
    return {**{f"{f}_accuracy": hits[f] / n for f in fields},
            "exact_match": sum(p == t for p, t in zip(answers.predictions, answers.truths)) / n}


def vision_report(model: VisionMoEGPT, data: VisionData, n: int = 200) -> dict[str, dict]:
    """Scores per source on ``n`` held-out examples, with and without the images shuffled."""
    report = {}
    for s, source in enumerate(data.sources):
        seen = greedy_answers(model, data, s, n)
        shuffled = greedy_answers(model, data, s, n, shuffle=True)
        report[source.name] = {"kind": source.kind, "n": len(seen.truths), "scores": scores(seen),
                               "shuffled_images": scores(shuffled),
                               "samples": [{"truth": t, "answer": p} for t, p in
                                           zip(seen.truths[:5], seen.predictions[:5])]}
    return report
