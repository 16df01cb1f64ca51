"""The image side's own training before the join: Flamingo's order (its vision encoder was trained
first, then the gated blocks learnt to read it), here with direct objectives on the generated data.

Why: in the joined model the tower and resampler learn only through the gated blocks, and the
gates start at 0, so the gradient reaching them is scaled by tanh(gate) ~ 0. Joined fresh, the
demo's answers ignored the picture (docs/vision.md). Here the tower and resampler learn what the
pictures show directly, from the flattened latents (N, L*Dv):
- scenes: a linear head per field (count, colour, shape, position), cross-entropy;
- screenshots: one linear head naming which characters the line shows (binary cross-entropy per
  character): order-free, but it makes the latents carry the glyphs.
The heads are then dropped; the latents keep what they read, which is what the gated blocks attend to.

Step s reads each source's training examples s*n .. s*n+n-1 (n: its share of the batch; examples
are pure functions of the index), so a pre-training is reproducible bit for bit, on one process or
on every rank of a layout.

Legend: N pictures, L latents, Dv latent width.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.data import image_gen
from moegpt.data.images import ImageProcessing, preprocess
from moegpt.data.vision_data import ImageTextSource
from moegpt.model.vision.vision_model import VisionMoEGPT

FIELDS: dict[str, tuple] = {
    "count": tuple(range(1, image_gen.MAX_COUNT + 1)),
    "colour": tuple(image_gen.COLOURS),
    "shape": image_gen.SHAPES,
    "position": tuple(image_gen.position_name(r, c) for r in range(3) for c in range(3)),
}
WARMUP = 50


CHARACTERS = tuple(chr(c) for c in range(33, 127))  # what a screenshot's line may show, less the space


@dataclass(frozen=True)
class PretrainReport:
    steps: int
    seconds: float
    final_loss: float
    accuracy: dict[str, float]  # held-out, from the heads: each scene field; screenshots' characters (F1)


def scene_batch(source: ImageTextSource, processing: ImageProcessing, split: str, first: int, n: int,
                seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Examples first .. first+n-1 of ``split`` -> pixels (n, C, S, S) and each field's class (n,)."""
    images, labels = [], {k: [] for k in FIELDS}
    for i in range(first, first + n):
        image, _, answer = source.example(split, i, seed, processing.output_size)
        scene = image_gen.Scene.parse(answer)
        images.append(image)
        for k, values in FIELDS.items():
            labels[k].append(values.index(getattr(scene, k)))
    return preprocess(images, processing), {k: torch.tensor(v) for k, v in labels.items()}


def screenshot_batch(source: ImageTextSource, processing: ImageProcessing, split: str, first: int, n: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples first .. first+n-1 of ``split`` -> pixels (n, C, S, S) and which characters each
    line shows (n, len(CHARACTERS)) 0/1."""
    images, shown = [], torch.zeros(n, len(CHARACTERS))
    index = {c: i for i, c in enumerate(CHARACTERS)}
    for r, i in enumerate(range(first, first + n)):
        image, _, answer = source.example(split, i, seed, processing.output_size)
        images.append(image)
        for c in set(answer) - {" "}:
            shown[r, index[c]] = 1.0
    return preprocess(images, processing), shown


def _f1(logits: torch.Tensor, shown: torch.Tensor) -> float:
    guess = logits > 0
    hits = float((guess & (shown > 0)).sum())
    return 2 * hits / max(1.0, float(guess.sum() + shown.sum()))


def pretrain_image_side(model: VisionMoEGPT, sources: Sequence[ImageTextSource], processing: ImageProcessing, *,
                        steps: int, batch_size: int, lr: float, seed: int, eval_n: int = 200,
                        log=None) -> PretrainReport:
    """Train ``model``'s tower (where it trains) and resampler for ``steps`` steps of ``batch_size``
    pictures, shared evenly by ``sources`` (AdamW at ``lr``, warm-up then cosine to a tenth), in
    place: a linear head per scene field (cross-entropy), and for screenshots one head naming the
    characters the line shows (binary cross-entropy per character, summed)."""
    if not sources or batch_size < len(sources):
        raise ValueError(f"pre-training the image side needs a source and at least one picture of each a step "
                         f"(batch size {batch_size}, {len(sources)} sources)")
    start = time.perf_counter()
    latents = model.vision_cfg.n_latents * model.vision_cfg.tower.hidden_size
    generator = torch.Generator().manual_seed(seed)
    outputs = {k: len(v) for k, v in FIELDS.items()} | {"characters": len(CHARACTERS)}
    heads = nn.ModuleDict({k: nn.Linear(latents, n) for k, n in outputs.items()})
    with torch.no_grad():
        for head in heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * latents ** -0.5)
            head.bias.zero_()
    dtype = model.resampler.latents.dtype
    heads.to(dtype)
    params = [p for m in (model.tower, model.resampler) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=0.0)
    shares = [batch_size // len(sources) + (j < batch_size % len(sources)) for j in range(len(sources))]

    def losses(source, split, first, n):  # -> (loss, held-out scores) of n pictures of ``source``
        if source.kind == "shapes":
            pixels, labels = scene_batch(source, processing, split, first, n, seed)
            flat = model.encode_images(pixels.to(dtype)).flatten(1)  # (n, L*Dv)
            logits = {k: heads[k](flat).float() for k in FIELDS}
            loss = sum(F.cross_entropy(logits[k], labels[k]) for k in FIELDS)
            return loss, {k: float((logits[k].argmax(-1) == labels[k]).float().mean()) for k in FIELDS}
        pixels, shown = screenshot_batch(source, processing, split, first, n, seed)
        logits = heads["characters"](model.encode_images(pixels.to(dtype)).flatten(1)).float()  # (n, chars)
        loss = F.binary_cross_entropy_with_logits(logits, shown, reduction="sum") / n
        return loss, {f"{source.name}_characters_f1": _f1(logits, shown)}

    was_training = model.training
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        warm = min(1.0, (step + 1) / WARMUP)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in opt.param_groups:
            group["lr"] = lr * warm * decay
        loss = sum(losses(source, "train", step * n, n)[0] for source, n in zip(sources, shares))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            log(f"moegpt: image side pre-training step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    accuracy = {}
    with torch.no_grad():
        for source in sources:
            accuracy |= losses(source, "val", 0, min(eval_n, source.val_size))[1]
    model.train(was_training)
    return PretrainReport(steps, time.perf_counter() - start, loss.item(), accuracy)
