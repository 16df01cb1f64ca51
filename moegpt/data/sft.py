"""Fine-tuning data: conversations (JSONL of OpenAI-style ``messages``) -> token rows whose loss
covers the assistant's tokens only, packed several conversations to a row.

A conversation is rendered through the model's chat template (chat.py: ``ChatFormat.tokens``),
which gives its token ids and which of them the assistant wrote. Its row entries are the inputs
ids[:-1], the targets ids[1:] (IGNORE where the assistant did not write the target), positions
0.. n-2 (each conversation starts at 0, as it does when served) and its document index. Rows hold
``seq_len`` entries; packing fills a row with whole conversations in order (the next one that does
not fit starts a new row) and pads the rest (targets IGNORE, each padding entry a document of its
own). The model's attention over a packed row is block-diagonal (model.attention.DocumentMask), so
a conversation's logits do not depend on its neighbours. Without packing, one conversation per row.

Named sets of conversations mix with epochs, as the pre-training sources do: the sampler
(sampler.py) draws rows, and its state resumes the data position exactly.

Legend: N rows, T seq_len.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moegpt.data.chat import ChatFormat, TemplateError
from moegpt.data.dataset import load_tokens, split_blocks, tokenize_source
from moegpt.data.sampler import SampledMixture
from moegpt.data.sources import Source, files_signature, files_source, shakespeare_source, stdlib_code_source
from moegpt.data.tokenizer import Tokenizer

IGNORE = -100  # cross_entropy's ignore_index: a target outside the loss
ROLES = ("system", "user", "assistant")

Conversation = tuple[dict[str, str], ...]  # messages: {"role", "content"}


def parse_conversation(line: str, where: str) -> tuple[Conversation, str | None]:
    """One JSONL line -> its messages and optional task name; ValueError naming ``where`` (the file and line)
    and the problem."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ValueError(f"{where}: want an object with a non-empty \"messages\" list")
    messages = []
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                             f"\"content\": a string}}, got {json.dumps(m)[:80]}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message (nothing to learn)")
    task = row.get("task")
    return tuple(messages), task if isinstance(task, str) else None


def read_jsonl(path: str | Path) -> list[tuple[Conversation, str | None]]:
    """Every conversation of a JSONL file (blank lines skipped), checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"conversation file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out.append(parse_conversation(line, f"{path}, line {n}"))
    if not out:
        raise ValueError(f"{path} holds no conversation")
    return out


@dataclass(frozen=True, kw_only=True)
class ConversationSet:
    """A named source of conversations, read ``epochs`` times per pass, with its held-out split."""

    name: str
    epochs: float
    train: tuple[Conversation, ...]
    val: tuple[Conversation, ...]
    val_tasks: tuple[str | None, ...] = ()  # the task of each held-out conversation, where known

    def __post_init__(self):
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"conversation source {self.name!r}: epochs {self.epochs!r} must be positive")
        if not self.train or not self.val:
            raise ValueError(f"conversation source {self.name!r} needs training and held-out conversations "
                             f"(has {len(self.train)} and {len(self.val)})")


def jsonl_source(name: str, path: str | Path, epochs: float, val_fraction: float) -> ConversationSet:
    """A JSONL file's conversations; the last ``val_fraction`` of them (at least one) held out."""
    rows = read_jsonl(path)
    n_val = max(1, math.floor(val_fraction * len(rows) + 0.5))
    if n_val >= len(rows):
        raise ValueError(f"{path}: {len(rows)} conversations are too few to hold out {n_val}")
    return ConversationSet(name=name, epochs=epochs, train=tuple(c for c, _ in rows[:-n_val]),
                           val=tuple(c for c, _ in rows[-n_val:]), val_tasks=tuple(t for _, t in rows[-n_val:]))


@dataclass(frozen=True, kw_only=True)
class CorpusSet:
    """Plain text among the conversations (a context-extension fine-tune keeps modelling text at
    every position): a pre-training source cut into rows of seq_len + 1 tokens, every token a
    target, its held-out split the one pre-training held out (dataset.split_blocks).

    With ``repeat_span`` S, each example is instead S tokens of the text followed by the same S
    tokens again (2S tokens, a document of its own), the second S the targets: they are predictable
    by copying from S tokens back. A model pre-trained on plain text alone may never learn to copy;
    the instruction tasks answer by copying words from the prompt, and these rows teach it
    (docs/finetune.md: a fixed distance is learnt in a few hundred steps, varied ones or a match by
    content were not)."""

    name: str
    epochs: float
    source: Source
    repeat_span: int | None = None

    def __post_init__(self):
        if self.repeat_span is not None and self.repeat_span < 1:
            raise ValueError(f"source {self.name!r}: repeat_span {self.repeat_span} must be >= 1")


COPY_SPAN = 32  # tokens of text each ``copy`` example repeats


def conversations_digest(sources: Sequence[ConversationSet | CorpusSet]) -> str:
    """A hash of the sources' conversations themselves, or a corpus's files (a resume refuses a data
    file edited since)."""
    h = hashlib.sha256()
    for s in sources:
        if isinstance(s, CorpusSet):
            spec = [s.name, s.epochs] + ([s.repeat_span] if s.repeat_span is not None else [])
            h.update(json.dumps(spec).encode() + files_signature(s.source.paths))
        else:
            h.update(json.dumps([s.name, s.epochs, s.train, s.val], sort_keys=True).encode())
    return h.hexdigest()


def parse_conversation_mixture(spec: str, val_fraction: float, seed: int = 0, *,
                               count_tokens: Callable[[Conversation], int] | None = None,
                               max_tokens: int | None = None,
                               min_tokens: int | None = None) -> tuple[ConversationSet | CorpusSet, ...]:
    """A CLI mixture of fine-tuning sources, e.g. "instructions:1", "instructions:1,mine=chats.jsonl:2"
    or "passkey:1,text:1": ``instructions`` and ``passkey`` are generated (instructions.py,
    passkey.py: its lengths run up to ``max_tokens`` as ``count_tokens`` counts them, from about
    ``min_tokens`` where given), ``text`` and
    ``code`` the pre-training corpora as plain text rows, ``copy`` spans of the Shakespeare corpus
    each followed by itself (CorpusSet.repeat_span), ``NAME=FILE.jsonl`` conversations, ``NAME=PATH``
    (any other file, or a directory) plain text rows."""
    from moegpt.data.instructions import instruction_source
    from moegpt.data.passkey import passkey_source

    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--data {spec!r} names no conversation source")
    out: list[ConversationSet | CorpusSet] = []
    for item in items:
        head, sep, epochs_text = item.rpartition(":")
        try:
            epochs = float(epochs_text) if sep and head else float("nan")
        except ValueError:
            epochs = float("nan")
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"--data item {item!r} must look like SOURCE:EPOCHS or NAME=FILE.jsonl:EPOCHS "
                             "with EPOCHS > 0")
        if head == "instructions":
            source = instruction_source(epochs, seed=seed)
        elif head == "passkey":
            if count_tokens is None or max_tokens is None:
                raise ValueError("--data passkey needs the model's tokenizer and a row length")
            source = passkey_source(epochs, count_tokens, max_tokens, min_tokens=min_tokens, seed=seed)
        elif head in ("text", "code"):
            corpus = shakespeare_source(epochs) if head == "text" else stdlib_code_source(epochs)
            source = CorpusSet(name=head, epochs=epochs, source=corpus)
        elif head == "copy":
            source = CorpusSet(name=head, epochs=epochs, source=shakespeare_source(epochs), repeat_span=COPY_SPAN)
        elif "=" in head and head.partition("=")[0] and head.partition("=")[2]:
            name, _, path = head.partition("=")
            if path.endswith(".jsonl"):
                source = jsonl_source(name, path, epochs, val_fraction)
            else:  # a text file or a directory of them: plain text rows
                source = CorpusSet(name=name, epochs=epochs, source=files_source(name, path, epochs))
        else:
            raise ValueError(f"--data item {item!r}: unknown source {head!r} "
                             "(use instructions, passkey, text, code, copy, NAME=FILE.jsonl or NAME=PATH)")
        if any(s.name == source.name for s in out):
            raise ValueError(f"--data item {item!r} repeats source name {source.name!r}")
        out.append(source)
    return tuple(out)


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Rows of packed conversations: what one training or validation step reads."""

    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next token ids, IGNORE outside the loss
    positions: torch.Tensor  # (N, T) position of each entry in its conversation
    docs: torch.Tensor  # (N, T) document of each entry (padding: a document each)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, start: int, end: int) -> "PackedBatch":
        return PackedBatch(self.inputs[start:end], self.targets[start:end], self.positions[start:end],
                           self.docs[start:end])

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.inputs, self.targets, self.positions, self.docs)))

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack(examples: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, packing: bool = True) -> PackedBatch:
    """Token ids and assistant masks of conversations (each at most seq_len + 1 tokens) -> rows."""
    rows: list[list[int]] = []  # indices of the examples in each row
    fill = seq_len  # entries used in the current row (seq_len: none open)
    for i, (ids, _) in enumerate(examples):
        n = len(ids) - 1
        if n > seq_len or n < 1:
            raise ValueError(f"conversation {i} has {len(ids)} tokens; a row holds 2 to {seq_len + 1}")
        if not packing or fill + n > seq_len:
            rows.append([])
            fill = 0
        rows[-1].append(i)
        fill += n
    N = len(rows)
    inputs = np.full((N, seq_len), pad_id, dtype=np.int64)
    targets = np.full((N, seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((N, seq_len), dtype=np.int64)
    docs = -1 - np.tile(np.arange(seq_len, dtype=np.int64), (N, 1))  # padding: a document of its own
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            ids, mask = examples[i]
            n = len(ids) - 1
            inputs[r, at:at + n] = ids[:-1]
            targets[r, at:at + n] = np.where(mask[1:], ids[1:], IGNORE)
            positions[r, at:at + n] = np.arange(n)
            docs[r, at:at + n] = d
            at += n
    return PackedBatch(*(torch.from_numpy(a) for a in (inputs, targets, positions, docs)))


@dataclass(frozen=True, eq=False)
class SFTData(SampledMixture):
    """Packed training and held-out rows of each conversation source (MixtureData's interface, so
    the one training loop runs either)."""

    sources: tuple[ConversationSet, ...]
    seq_len: int
    vocab_size: int
    train: tuple[PackedBatch, ...]
    val: tuple[PackedBatch, ...]
    dropped: dict[str, int] = field(default_factory=dict)  # conversations longer than a row, per source

    @property
    def train_block_counts(self) -> tuple[int, ...]:
        return tuple(len(b) for b in self.train)

    def gather(self, samples: torch.Tensor) -> PackedBatch:
        """Rows for sampler output ``samples`` (n, 2) [source, row], in that order."""
        return _gather(self.train, samples)

    def val_batches(self, batch_size: int, source: int | str | None = None,
                    max_sequences: int | None = None) -> Iterator[PackedBatch]:
        """Every held-out row once, in order, in batches of at most ``batch_size`` rows."""
        chosen = range(len(self.sources)) if source is None else (
            self.names.index(source) if isinstance(source, str) else source,)
        pairs = torch.cat([torch.stack((torch.full((len(self.val[s]),), s), torch.arange(len(self.val[s]))), 1)
                           for s in chosen])
        if max_sequences is not None:
            pairs = pairs[:max_sequences]
        for first in range(0, pairs.shape[0], batch_size):
            yield _gather(self.val, pairs[first:first + batch_size])

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/token) on the held-out loss targets of the training targets' unigram
        frequencies (add-one smoothed): what a model that ignores the conversation reaches."""
        counts = np.ones(self.vocab_size, dtype=np.float64)
        for b in self.train:
            t = b.targets[b.targets != IGNORE].numpy()
            counts += np.bincount(t, minlength=self.vocab_size)[:self.vocab_size]
        log_p = np.log(counts / counts.sum())
        val = np.concatenate([b.targets[b.targets != IGNORE].numpy() for b in self.val])
        return float(-log_p[val].mean())


def _gather(parts: tuple[PackedBatch, ...], pairs: torch.Tensor) -> PackedBatch:
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"samples must have shape (n, 2), got {tuple(pairs.shape)}")
    picked = [parts[s].rows(r, r + 1) for s, r in pairs.tolist()]
    return PackedBatch(*(torch.cat([getattr(p, f) for p in picked]) for f in ("inputs", "targets", "positions", "docs")))


def corpus_examples(source: CorpusSet, tokenizer: Tokenizer, seq_len: int, cache_dir: str | Path,
                    val_fraction: float) -> tuple[list, list]:
    """A corpus's training and held-out rows as (ids, target mask) examples: seq_len + 1 tokens, all
    targets, or with ``repeat_span`` S, S tokens twice over, the second S targets."""
    tokens = load_tokens(tokenize_source(source.source, tokenizer, cache_dir))
    span = source.repeat_span
    if span is not None and 2 * span > seq_len + 1:
        raise ValueError(f"source {source.name!r}: a span of {span} tokens repeated needs rows of at least "
                         f"{2 * span - 1} tokens (--seq-len {seq_len})")
    block = seq_len if span is None else span
    try:
        splits = split_blocks(len(tokens), block, val_fraction)
    except ValueError as e:
        raise ValueError(f"source {source.name!r}: {e}") from None

    def example(at: int) -> tuple[list[int], list[bool]]:
        if span is None:  # a block of text, every token a target
            return tokens[at:at + block + 1].astype(np.int64).tolist(), [True] * (block + 1)
        copy = tokens[at:at + span].astype(np.int64).tolist()  # the span, then the span again as the targets
        return copy + copy, [False] * span + [True] * span

    return [[example(at) for at in range(start, start + n * block, block)] for start, n in splits]


def build_sft_data(sources: Sequence[ConversationSet | CorpusSet], tokenizer: Tokenizer, fmt: ChatFormat,
                   seq_len: int, packing: bool = True, drop_long: bool = True, cache_dir: str | Path | None = None,
                   val_fraction: float = 0.05) -> SFTData:
    """Render, tokenize and pack every source. A conversation longer than a row (seq_len + 1 tokens)
    is dropped and counted, or with ``drop_long=False`` an error naming it. A corpus is tokenized
    (cached under ``cache_dir``) and cut into rows."""
    if not sources:
        raise ValueError("fine-tuning needs at least one conversation source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"conversation source names must be unique, got {names}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train, val, dropped = [], [], {}
    for s in sources:
        if isinstance(s, CorpusSet):
            if cache_dir is None:
                raise ValueError(f"source {s.name!r}: a corpus needs a token cache directory")
            rows = corpus_examples(s, tokenizer, seq_len, cache_dir, val_fraction)
            train.append(pack(rows[0], seq_len, pad, packing))
            val.append(pack(rows[1], seq_len, pad, packing))
            continue
        packed = []
        for split, convs in (("training", s.train), ("held-out", s.val)):
            examples = []
            for i, conv in enumerate(convs):
                try:
                    ids, mask = fmt.tokens(tokenizer, list(conv))
                except TemplateError as e:
                    raise ValueError(f"source {s.name!r}, {split} conversation {i}: {e}") from None
                if len(ids) > seq_len + 1:
                    if not drop_long:
                        raise ValueError(f"source {s.name!r}, {split} conversation {i}: {len(ids)} tokens is longer "
                                         f"than a row ({seq_len + 1}); raise --seq-len or drop long conversations")
                    dropped[s.name] = dropped.get(s.name, 0) + 1
                    continue
                examples.append((ids, mask))
            if not examples:
                raise ValueError(f"source {s.name!r}: every {split} conversation is longer than a row ({seq_len + 1} tokens)")
            packed.append(pack(examples, seq_len, pad, packing))
        train.append(packed[0])
        val.append(packed[1])
    return SFTData(tuple(sources), seq_len, tokenizer.vocab_size, tuple(train), tuple(val), dropped)
