"""A sentencepiece ``tokenizer.model`` as a `tokenizers.Tokenizer`, the way transformers 5 converts one.

Llama/Mistral-family directories often carry only the sentencepiece model. `read_model` parses the
few ModelProto fields a conversion needs with a small protobuf reader of our own (no protobuf or
sentencepiece dependency); `to_hf_tokenizer` builds what transformers' AutoTokenizer builds from the
same file (``SpmConverter.build_tokenizer_from_spm_proto`` + ``TokenizersBackend``): BPE (merges
ranked by piece score) or Unigram, byte fallback, the model's normalizer (precompiled charsmap,
extra-space removal, whitespace escaping, dummy prefix as ``legacy`` says), and control pieces plus
bos/eos/unk as special tokens. The tests compare ids and text with AutoTokenizer on one directory.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


@dataclass(frozen=True, kw_only=True)
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass(frozen=True, kw_only=True)
class SentencePieceModel:
    """The fields of a ModelProto a conversion reads, with the proto's defaults."""

    pieces: tuple[Piece, ...]
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int | None = 0
    bos_token: str | None = "<s>"  # None: the model has none (the proto says id -1)
    eos_token: str | None = "</s>"
    unk_token: str | None = "<unk>"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# ---------------------------------------------------------------------------------- protobuf wire
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one message: varints and fixed ints as ints, length-delimited as bytes."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        if i > len(buf):
            raise ValueError(f"field {number} runs past the end of the message")
        out.append((number, value))
    return out


def _int32(v: int) -> int:
    """A varint-encoded int32: negative values arrive as 64-bit two's complement."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _text(v: bytes) -> str:
    return bytes(v).decode("utf-8")


def _float(v: int) -> float:
    return struct.unpack("<f", v.to_bytes(4, "little"))[0]


def read_model(path: str | Path) -> SentencePieceModel:
    """Parse a sentencepiece model file; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        return parse_model(path.read_bytes())
    except (ValueError, UnicodeDecodeError, struct.error, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a sentencepiece model ({e})") from None


def parse_model(buf: bytes) -> SentencePieceModel:
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _fields(buf):
        if number == 1:  # repeated SentencePiece
            f = dict(_fields(value))
            pieces.append(Piece(piece=_text(f.get(1, b"")), score=_float(f.get(2, 0)), type=f.get(3, NORMAL)))
        elif number == 2:  # TrainerSpec
            trainer.update(_fields(value))
        elif number == 3:  # NormalizerSpec
            normalizer.update(_fields(value))
    if not pieces:
        raise ValueError("it has no pieces")

    def special(id_field: int, default_id: int, piece_field: int, default_piece: str) -> tuple[int | None, str | None]:
        token_id = _int32(trainer.get(id_field, default_id))
        if not 0 <= token_id < len(pieces):
            return None, None
        return token_id, _text(trainer.get(piece_field, default_piece.encode())) or pieces[token_id].piece

    unk_id, unk = special(40, 0, 45, "<unk>")
    return SentencePieceModel(
        pieces=tuple(pieces), model_type=trainer.get(3, UNIGRAM), byte_fallback=bool(trainer.get(35, 0)),
        unk_id=unk_id, bos_token=special(41, 1, 46, "<s>")[1], eos_token=special(42, 2, 47, "</s>")[1],
        unk_token=unk, precompiled_charsmap=bytes(normalizer.get(2, b"")),
        add_dummy_prefix=bool(normalizer.get(3, 1)), remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)))


# ------------------------------------------------------------------------------------ conversion
def to_hf_tokenizer(sp: SentencePieceModel, legacy: bool = True) -> HFTokenizer:
    """The `tokenizers.Tokenizer` transformers builds from this model (no post-processor: the caller
    adds BOS/EOS rules). ``legacy`` (tokenizer_config.json's, default True as transformers): a dummy
    prefix before every chunk between special tokens, else only at the start of the text."""
    user_defined = [p.piece for p in sp.pieces if p.type == USER_DEFINED]
    if sp.model_type == UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in sp.pieces], unk_id=sp.unk_id,
                               byte_fallback=sp.byte_fallback)
    else:  # transformers reads every other type (BPE, WORD, CHAR) as BPE
        vocab = {p.piece: i for i, p in enumerate(sp.pieces)}
        model = models.BPE(vocab=vocab, merges=_merges(sp), unk_token=sp.unk_token, fuse_unk=True,
                           byte_fallback=sp.byte_fallback, dropout=None, ignore_merges=bool(user_defined))
    hf = HFTokenizer(model)

    # Normalizer, in sentencepiece's order.
    steps = [normalizers.Precompiled(sp.precompiled_charsmap)] if sp.precompiled_charsmap else []
    if sp.remove_extra_whitespaces:  # spaces only: sentencepiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if sp.add_dummy_prefix and legacy:
        # Metaspace skips the dummy prefix when the text already starts with "▁"; sentencepiece doesn't.
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    hf.normalizer = normalizers.Sequence(steps)

    pre = []
    if sp.add_dummy_prefix:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first",
                                            split=False))
    if user_defined:  # sentencepiece emits user-defined pieces whole, never merged with neighbours
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        hf.pre_tokenizer = pre_tokenizers.Sequence(pre)

    steps = [decoders.Replace("▁", " ")]
    if sp.byte_fallback:
        steps.append(decoders.ByteFallback())
    if sp.add_dummy_prefix:  # fuse first, so Strip removes only the text's leading space
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif sp.byte_fallback:
        steps.append(decoders.Fuse())
    hf.decoder = decoders.Sequence(steps)

    # Special tokens as transformers' TokenizersBackend adds them: bos/eos/unk and the control pieces,
    # matched whole in the text and skipped by decode(skip_special_tokens=True).
    control = [p.piece for p in sp.pieces if p.type == CONTROL]
    specials = list(dict.fromkeys(t for t in [sp.bos_token, sp.eos_token, sp.unk_token, *control] if t))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return hf


def _merges(sp: SentencePieceModel) -> list[tuple[str, str]]:
    """BPE merges from the pieces: every split of a normal piece into two normal pieces, best score first
    (ties by id), as transformers derives them; sentencepiece stores no merge list."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(sp.pieces) if p.type == NORMAL}
    ranked = []
    for token, (score, i) in normal.items():
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]
