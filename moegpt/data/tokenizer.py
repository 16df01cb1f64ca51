"""Byte-level BPE tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

`Tokenizer.train` builds our own vocabulary (special tokens first, then the 256-byte
alphabet, then merges), `Tokenizer.load` reads any `tokenizer.json` (ours or e.g. a
Llama/Mixtral one) or, without one, a sentencepiece `tokenizer.model` (converted as
transformers converts it), and `save` writes a directory that `transformers.AutoTokenizer`
loads with identical ids.

Special tokens are added only when asked. `encode(text, add_special_tokens=True)` adds them
as the tokenizer's own rule says, as `AutoTokenizer(text)["input_ids"]` does (transformers 5):
with a tokenizer.json its post-processor decides (tokenizer_config.json's `add_bos_token` is
ignored there, as transformers ignores it; no post-processor: nothing added); a converted
sentencepiece model follows `add_bos_token` / `add_eos_token` (default off). `add_bos=True`
prepends BOS whatever the rule (the training tools' explicit choice).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from moegpt.atomic import write_text_atomic

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE = "<|image|>"
NUM_RESERVED = 10
# Order fixes the ids: bos=0, eos=1, pad=2, then chat/image markers, then spare slots
# so later features can claim a special token without changing the vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, IM_START, IM_END, IMAGE) + tuple(
    f"<|reserved_{i}|>" for i in range(NUM_RESERVED)
)
BYTE_ALPHABET_SIZE = 256
SENTENCEPIECE_FILE = "tokenizer.model"  # a Llama/Mistral-style directory's sentencepiece model
# The chat format of our tokenizers (ChatML with our specials), stored HF-style as a Jinja template in
# tokenizer_config.json's "chat_template"; the server renders it as transformers' apply_chat_template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fallback names tried (in order) when no tokenizer_config.json names the token.
_KNOWN_BOS = (BOS, "<s>", "<|begin_of_text|>")
_KNOWN_EOS = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>")
_KNOWN_PAD = (PAD, "<pad>")


class Tokenizer:
    """Encode/decode text; knows its bos/eos/pad ids (None where the vocab has none)."""

    def __init__(
        self,
        hf: HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._hf = hf
        self.chat_template = chat_template  # Jinja, HF style; None: this tokenizer has no chat format
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._pad_token = pad_token
        self._bos_id = self._id_of(bos_token)
        self._eos_id = self._id_of(eos_token)
        self._pad_id = self._id_of(pad_token)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    # ----------------------------------------------------------------- construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE vocabulary of exactly `vocab_size` entries on `texts`."""
        minimum = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
        if vocab_size < minimum:
            raise ValueError(f"vocab_size {vocab_size} is below the minimum {minimum} (bytes + special tokens)")
        hf = HFTokenizer(models.BPE())
        # use_regex=True gives GPT-2-style word splitting, so merges never cross word
        # boundaries; add_prefix_space=False keeps decode(encode(s)) == s exactly.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            # The full byte alphabet up front: any input is encodable, never <unk>.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            min_frequency=2,
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        shortfall = vocab_size - hf.get_vocab_size(with_added_tokens=True)
        if shortfall > 0:
            # A small corpus can run out of merges; pad with more reserved slots so the
            # model's embedding size is always what the caller asked for.
            extra = [f"<|reserved_{NUM_RESERVED + i}|>" for i in range(shortfall)]
            hf.add_special_tokens(extra)
        return cls(hf, BOS, EOS, PAD, CHAT_TEMPLATE)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a model directory (tokenizer.json, else a sentencepiece tokenizer.model; with its
        tokenizer_config.json) or a tokenizer.json / tokenizer.model file."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        json_path = path / "tokenizer.json" if path.is_dir() else path
        sp_path = path / SENTENCEPIECE_FILE if path.is_dir() else path
        config = _read_token_config(directory)
        if (path.is_dir() and not json_path.is_file() and sp_path.is_file()) or (path.is_file() and path.suffix == ".model"):
            return cls._from_sentencepiece(sp_path, config)
        if not json_path.is_file():
            raise ValueError(f"no tokenizer.json (or sentencepiece {SENTENCEPIECE_FILE}) found at {path}")
        try:
            hf = HFTokenizer.from_file(str(json_path))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot parse tokenizer file {json_path}: {first_line}") from None
        vocab = hf.get_vocab(with_added_tokens=True)
        bos = config.get("bos_token") or _first_known(vocab, _KNOWN_BOS)
        eos = config.get("eos_token") or _first_known(vocab, _KNOWN_EOS)
        pad = config.get("pad_token") or _first_known(vocab, _KNOWN_PAD)
        return cls(hf, bos, eos, pad, config.get("chat_template"))

    @classmethod
    def _from_sentencepiece(cls, sp_path: Path, config: dict[str, Any]) -> Tokenizer:
        """A sentencepiece model converted as transformers' AutoTokenizer converts it (legacy defaults to
        True), with its BOS/EOS rule from tokenizer_config.json's add_bos_token / add_eos_token."""
        from moegpt.data.sentencepiece_model import read_model, to_hf_tokenizer

        sp = read_model(sp_path)
        hf = to_hf_tokenizer(sp, legacy=config.get("legacy", True))
        bos = config.get("bos_token") or sp.bos_token
        eos = config.get("eos_token") or sp.eos_token
        pad = config.get("pad_token")
        for token in (bos, eos, pad):
            if token is not None and hf.token_to_id(token) is None:  # named only in the config: add it
                hf.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        hf.post_processor = _bos_eos_template(hf, bos if config.get("add_bos_token") else None,
                                              eos if config.get("add_eos_token") else None)
        return cls(hf, bos, eos, pad, config.get("chat_template"))

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json loadable by transformers.AutoTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "tokenizer.json", self.to_json())
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # Off, or transformers' decode would rewrite " ." into "." and break round trips.
            "clean_up_tokenization_spaces": False,
        }
        named = {"bos_token": self._bos_token, "eos_token": self._eos_token, "pad_token": self._pad_token}
        config.update({key: token for key, token in named.items() if token is not None})
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    # ---------------------------------------------------------------------- coding
    def encode(self, text: str, add_special_tokens: bool = False, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. `add_special_tokens`: the tokenizer's own BOS/EOS rule, as
        `AutoTokenizer(text)["input_ids"]` (a prompt); `add_bos`: BOS prepended, whatever the rule."""
        _check_one_rule(add_special_tokens, add_bos)
        # The rule is the tokenizer's post-processor (e.g. Llama's "<s> $A"); False leaves it out.
        ids = self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        return [self._require_bos(), *ids] if add_bos else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no added specials) and each token's [start, end) characters in it."""
        enc = self._hf.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False, *,
                     add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts, tokenized in parallel on the Rust side."""
        _check_one_rule(add_special_tokens, add_bos)
        encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        if add_bos:
            bos = self._require_bos()
            return [[bos, *e.ids] for e in encodings]
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def _require_bos(self) -> int:
        if self._bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos token")
        return self._bos_id

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def to_json(self) -> str:
        """The full tokenizer.json text; identifies the tokenizer for cache fingerprints."""
        return self._hf.to_str()

    @property
    def fingerprint(self) -> str:
        """Short stable hash of the tokenizer definition and its bos/eos/pad choice."""
        digest = hashlib.sha256(self.to_json().encode("utf-8"))
        digest.update(repr((self._bos_token, self._eos_token, self._pad_token)).encode("utf-8"))
        return digest.hexdigest()[:16]

    @property
    def hf(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`, for callers needing features we don't wrap."""
        return self._hf


def _check_one_rule(add_special_tokens: bool, add_bos: bool) -> None:
    if add_special_tokens and add_bos:
        raise ValueError("add_special_tokens=True and add_bos=True are two BOS rules: pass one")


def _bos_eos_template(hf: HFTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """transformers' TokenizersBackend.update_post_processor: "[bos] $A [eos]" (pairs: the same twice)."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    specials = [(t, hf.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _read_token_config(directory: Path) -> dict[str, Any]:
    """bos/eos/pad token strings from tokenizer_config.json (values may be str or {"content": str}),
    its chat_template when that is one Jinja string, and the booleans add_bos_token, add_eos_token
    and legacy when set."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {config_path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    found: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = raw.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            found[key] = value
    if isinstance(raw.get("chat_template"), str) and raw["chat_template"]:
        found["chat_template"] = raw["chat_template"]
    for key in ("add_bos_token", "add_eos_token", "legacy"):
        if isinstance(raw.get(key), bool):
            found[key] = raw[key]
    return found


def _first_known(vocab: dict[str, int], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in vocab), None)
