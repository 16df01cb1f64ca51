"""Image-text training data: named generated sources with epochs (the article's mixture, extended to
pictures), rows of chat-rendered conversations whose user turn carries an image token, and the
pictures' pixel values beside them.

A row is one conversation (no packing: a token must never see the image of another conversation)::

    <|im_start|>user\\n<|image|>\\nTranscribe the text.<|im_end|>\\n<|im_start|>assistant\\nCast your ...<|im_end|>

rendered by the model's chat template; the loss covers the assistant's tokens only (data/chat.py).
Example ``i`` of a source's split is a pure function of (source, split, i, seed), drawn when a step
gathers it, so the data position is the sampler's (data/sampler.py) and a resumed run sees exactly
the pictures and rows an unbroken run would.

Legend: N rows, T seq_len, M images, S image side.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from moegpt.data import image_gen
from moegpt.data.chat import ChatFormat
from moegpt.data.images import ImageProcessing, preprocess
from moegpt.data.sampler import SampledMixture
from moegpt.data.sft import IGNORE
from moegpt.data.sources import _NAME_PATTERN, shakespeare_source, stdlib_code_source
from moegpt.data.tokenizer import IMAGE, Tokenizer

KINDS = ("screenshots", "shapes")
TRAIN_SIZE = {"screenshots": 60_000, "shapes": 40_000}  # generated examples per pass
VAL_SIZE = 500
HELD_OUT = 0.1  # share of each corpus's lines (its end) the held-out screenshots show


@dataclass(frozen=True, kw_only=True)
class ImageTextSource:
    """A generated source: ``kind`` screenshots or shapes, read ``epochs`` times per pass."""

    name: str
    kind: str
    epochs: float
    train_size: int
    val_size: int = VAL_SIZE
    lines: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # screenshots: (training, held-out) lines

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"source name {self.name!r} must match [A-Za-z0-9_.-]+")
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"source {self.name!r} epochs {self.epochs!r} must be a positive finite number")
        if self.kind == "screenshots" and not all(self.lines):
            raise ValueError(f"source {self.name!r}: screenshots need training and held-out lines")

    def example(self, split: str, index: int, seed: int, size: int) -> tuple[object, str, str]:
        """(PIL image, prompt, answer) of example ``index`` of ``split`` ("train" or "val")."""
        key = f"{self.name}:{split}:{index}:{seed}"
        rng = random.Random(key)
        if self.kind == "shapes":
            image, scene = image_gen.render_shapes(rng, size)
            return image, image_gen.SHAPES_PROMPT, scene.answer()
        lines = self.lines[0 if split == "train" else 1]
        line = lines[rng.randrange(len(lines))]
        return image_gen.render_screenshot(rng, line, size), image_gen.SCREENSHOT_PROMPT, line


def corpus_lines(held_out: float = HELD_OUT) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Screenshot lines of the bundled Shakespeare and of Python's standard library: (training,
    held-out), each corpus's last ``held_out`` share held out (less any line training also shows),
    the two corpora interleaved."""
    train, val = [], []
    for source in (shakespeare_source(), stdlib_code_source()):
        lines = [ln for path in source.paths for ln in image_gen.screenshot_lines(
            path.read_text(encoding="utf-8", errors="replace"))]
        cut = int(len(lines) * (1 - held_out))
        seen = set(lines[:cut])
        train.append(lines[:cut])
        val.append([ln for ln in lines[cut:] if ln not in seen])  # a repeated line is a training line

    def interleave(a: list[str], b: list[str]) -> tuple[str, ...]:
        n = min(len(a), len(b))
        return tuple(x for pair in zip(a[:n], b[:n]) for x in pair) + tuple(a[n:]) + tuple(b[n:])

    return interleave(*train), interleave(*val)


def parse_vision_mixture(spec: str) -> tuple[ImageTextSource, ...]:
    """``screenshots:1,shapes:2`` -> sources (a name may be given: ``NAME=KIND:EPOCHS``)."""
    out, lines = [], None
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        head, sep, epochs_text = item.rpartition(":")
        if not sep:
            head, epochs_text = item, "1"
        name, _, kind = head.partition("=") if "=" in head else (head, "", head)
        try:
            epochs = float(epochs_text)
        except ValueError:
            raise ValueError(f"--data item {item!r}: epochs {epochs_text!r} is not a number") from None
        if kind not in KINDS:
            raise ValueError(f"--data item {item!r}: unknown image source {kind!r} (use {' or '.join(KINDS)})")
        if any(s.name == name for s in out):
            raise ValueError(f"--data item {item!r} repeats source name {name!r}")
        if kind == "screenshots" and lines is None:
            lines = corpus_lines()
        out.append(ImageTextSource(name=name, kind=kind, epochs=epochs, train_size=TRAIN_SIZE[kind],
                                   lines=lines if kind == "screenshots" else ((), ())))
    if not out:
        raise ValueError(f"--data {spec!r} names no image source")
    return tuple(out)


def image_marker() -> str:
    """How a picture stands in a message's text: its image token and a line break (training renders
    it so, and the server and ``moegpt generate --image`` render image parts the same way)."""
    return f"{IMAGE}\n"


def conversation(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    """The user turn with its image token first, and the assistant's answer (None: none yet)."""
    messages = [{"role": "user", "content": image_marker() + prompt}]
    return messages if answer is None else messages + [{"role": "assistant", "content": answer}]


@dataclass(frozen=True, eq=False)
class VisionBatch:
    """Rows of image conversations and their images: what one step (or validation batch) reads."""

    inputs: torch.Tensor  # (N, T) token ids, padded
    targets: torch.Tensor  # (N, T) next token ids, IGNORE outside the assistant's tokens
    locations: torch.Tensor  # (N, T) bool: the image tokens, rows' images in order
    pixels: torch.Tensor  # (M, 3, S, S) the images, in the order of their tokens (row-major)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, start: int, end: int) -> "VisionBatch":
        per_row = self.locations.sum(1)  # (N,) images of each row
        first, last = int(per_row[:start].sum()), int(per_row[:end].sum())
        return VisionBatch(self.inputs[start:end], self.targets[start:end], self.locations[start:end],
                           self.pixels[first:last])

    def to(self, device: torch.device) -> "VisionBatch":
        return VisionBatch(*(t.to(device) for t in (self.inputs, self.targets, self.locations, self.pixels)))

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


@dataclass(frozen=True, eq=False)
class VisionData(SampledMixture):
    """Generated image conversations of each source (MixtureData's interface, so the one training
    loop runs them)."""

    sources: tuple[ImageTextSource, ...]
    tokenizer: Tokenizer
    chat: ChatFormat
    processing: ImageProcessing
    seq_len: int
    seed: int
    image_token: int = field(init=False)

    def __post_init__(self) -> None:
        image_token = self.tokenizer.token_to_id(IMAGE)
        if image_token is None:
            raise ValueError(f"the tokenizer has no {IMAGE} token: vision needs moegpt's tokenizer or one with it")
        object.__setattr__(self, "image_token", image_token)

    @property
    def train_block_counts(self) -> tuple[int, ...]:
        return tuple(s.train_size for s in self.sources)

    @property
    def image_size(self) -> int:
        return self.processing.output_size

    def example_tokens(self, prompt: str, answer: str) -> tuple[list[int], list[bool]]:
        ids, mask = self.chat.tokens(self.tokenizer, conversation(prompt, answer))
        if ids.count(self.image_token) != 1:
            raise ValueError(f"the chat template rendered {ids.count(self.image_token)} image tokens for one image")
        return ids, mask

    def batch(self, split: str, pairs: Sequence[tuple[int, int]]) -> VisionBatch:
        """Rows for ``pairs`` of (source, index) of ``split``, in that order."""
        T = self.seq_len
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        inputs = np.full((len(pairs), T), pad, dtype=np.int64)
        targets = np.full((len(pairs), T), IGNORE, dtype=np.int64)
        images = []
        for r, (s, i) in enumerate(pairs):
            image, prompt, answer = self.sources[s].example(split, i, self.seed, self.image_size)
            ids, mask = self.example_tokens(prompt, answer)
            if len(ids) > T + 1:
                raise ValueError(f"source {self.sources[s].name!r} {split} example {i}: {len(ids)} tokens is "
                                 f"longer than a row ({T + 1}); raise --seq-len")
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = np.where(mask[1:], ids[1:], IGNORE)
            images.append(image)
        inputs_t = torch.from_numpy(inputs)
        return VisionBatch(inputs_t, torch.from_numpy(targets), inputs_t == self.image_token,
                           preprocess(images, self.processing))

    def gather(self, samples: torch.Tensor) -> VisionBatch:
        """Rows for sampler output ``samples`` (n, 2) [source, example], in that order."""
        if samples.ndim != 2 or samples.shape[1] != 2:
            raise ValueError(f"samples must have shape (n, 2), got {tuple(samples.shape)}")
        return self.batch("train", [tuple(p) for p in samples.tolist()])

    def val_pairs(self, source: int | str | None = None, max_sequences: int | None = None) -> list[tuple[int, int]]:
        chosen = range(len(self.sources)) if source is None else (
            self.names.index(source) if isinstance(source, str) else source,)
        pairs = [(s, i) for s in chosen for i in range(self.sources[s].val_size)]
        return pairs if max_sequences is None else pairs[:max_sequences]

    def val_batches(self, batch_size: int, source: int | str | None = None,
                    max_sequences: int | None = None) -> Iterator[VisionBatch]:
        """Every held-out example once, in order, in batches of at most ``batch_size`` rows."""
        pairs = self.val_pairs(source, max_sequences)
        for first in range(0, len(pairs), batch_size):
            yield self.batch("val", pairs[first:first + batch_size])

    def unigram_entropy(self, sample: int = 2000) -> float:
        """Cross-entropy (nats/token) on held-out answer tokens of the answers' unigram frequencies
        (``sample`` training answers per source, add-one smoothed): a model that ignores the image."""
        counts = np.ones(self.tokenizer.vocab_size, dtype=np.float64)
        val = []
        for s, source in enumerate(self.sources):
            for split, n, into in (("train", min(sample, source.train_size), None), ("val", source.val_size, val)):
                for i in range(n):
                    ids, mask = self.example_tokens(*self._text(source, split, i))
                    answer = [t for t, m in zip(ids, mask) if m]
                    if into is None:
                        np.add.at(counts, answer, 1)
                    else:
                        into.extend(answer)
        log_p = np.log(counts / counts.sum())
        return float(-log_p[np.array(val)].mean())

    def _text(self, source: ImageTextSource, split: str, index: int) -> tuple[str, str]:
        _, prompt, answer = source.example(split, index, self.seed, self.image_size)
        return prompt, answer

    def bytes_per_token(self, sample: int = 64) -> dict[str, float]:
        """Measured I/O per training token (the article's ~150x): per source, the PNG bytes and raw
        pixel bytes of an example's image over its row's tokens; and the bundled text's UTF-8 bytes
        per token with this tokenizer."""
        out = {}
        for source in self.sources:
            png = pixels = tokens = 0
            for i in range(min(sample, source.val_size)):
                image, prompt, answer = source.example("val", i, self.seed, self.image_size)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                png += len(buffer.getvalue())
                pixels += image.width * image.height * len(image.getbands())
                tokens += len(self.example_tokens(prompt, answer)[0])
            out[f"{source.name}_png_bytes_per_token"] = png / tokens
            out[f"{source.name}_pixel_bytes_per_token"] = pixels / tokens
        text = shakespeare_source().paths[0].read_text(encoding="utf-8")[:200_000]
        out["text_bytes_per_token"] = len(text.encode()) / len(self.tokenizer.encode(text))
        return out
