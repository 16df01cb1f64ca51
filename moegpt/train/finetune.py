"""What a fine-tuning run adds to the trainer: the model directory it starts from (weights and
tokenizer), the chat format its conversations are rendered with, and how rows are packed.

``moegpt finetune --model DIR --out DIR --data instructions:1`` builds one of these and runs the
one training loop (trainer.py) over data.sft's packed conversation rows. The settings are recorded
in ``OUT/finetune.json`` and in every checkpoint (a resume with other settings is refused), and the
output directory's tokenizer carries the chat template it was trained with, so ``moegpt serve`` on
it renders chats exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moegpt.atomic import write_text_atomic
from moegpt.checkpoint.model_dir import load
from moegpt.config import ModelConfig, RopeScaling
from moegpt.data.chat import ChatFormat, chat_format
from moegpt.data.tokenizer import CHAT_TEMPLATE, Tokenizer


@dataclass(frozen=True, kw_only=True)
class Finetune:
    model_cfg: ModelConfig
    weights: dict[str, torch.Tensor]  # the base model's parameters (fp32)
    tokenizer: Tokenizer  # the base model's, with the chat template training renders with
    chat: ChatFormat
    packing: bool
    drop_long: bool  # drop conversations longer than a row (counted) rather than refuse them
    settings: dict  # what the run records: base directory, data, template, packing

    def record(self, out: Path) -> None:
        write_text_atomic(out / "finetune.json", json.dumps(self.settings, indent=2) + "\n")


def extended_config(cfg: ModelConfig, context: str, rope_type: str) -> ModelConfig:
    """The model at a longer context: ``context`` "4x" (a factor of its max_seq_len, the context it
    was pre-trained at) or a length in tokens; RoPE scaled by ``rope_type`` (linear, dynamic, yarn)."""
    if cfg.rope_scaling is not None:
        raise ValueError(f"--context: the model already has {cfg.rope_scaling.type.value} rope scaling; "
                         "extend a model with plain RoPE")
    base = cfg.max_seq_len
    text = context.strip().lower()
    try:
        length = round(base * float(text[:-1])) if text.endswith("x") else int(text)
    except ValueError:
        raise ValueError(f"--context {context!r}: want a factor such as 4x or a length in tokens") from None
    if length <= base:
        raise ValueError(f"--context {context}: {length} tokens is not longer than the model's context ({base}); "
                         "the scaling factor must be > 1")
    scaling = RopeScaling(type=rope_type, factor=length / base, original_max_seq_len=base)
    return cfg.replace(max_seq_len=length, rope_scaling=scaling)


def read_chat_model(model_dir: Path, chat_template: str | None, text_only: bool = False):
    """A model directory to tune further -> (model, tokenizer, chat format); the tokenizer carries the
    template training renders with (``chat_template``'s text, else its own, else moegpt's ChatML).
    A missing directory, tokenizer or template is a one-line error."""
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir} is not a model directory (no config.json)")
    model, tokenizer = load(model_dir, text_only=text_only)
    if tokenizer is None:
        raise ValueError(f"--model {model_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    fmt = chat_format(tokenizer, chat_template)
    if fmt is None:
        raise ValueError(f"--model {model_dir} has no chat template and its tokenizer lacks moegpt's chat tokens: "
                         "pass --chat-template FILE")
    tokenizer.chat_template = chat_template or tokenizer.chat_template or CHAT_TEMPLATE
    return model, tokenizer, fmt


def finetune_inputs(model_dir: str | Path, data: str, *, chat_template: str | None = None, packing: bool = True,
                    drop_long: bool = True, context: str | None = None, rope_type: str = "yarn") -> Finetune:
    """Read the base model directory; ``chat_template``: a Jinja template's text, which overrides the
    tokenizer's. A model with neither a template nor moegpt's chat tokens is a one-line error.
    ``context``: extend the model's context (``extended_config``)."""
    model_dir = Path(model_dir)
    model, tokenizer, fmt = read_chat_model(model_dir, chat_template)
    cfg = model.cfg if context is None else extended_config(model.cfg, context, rope_type)
    settings = {"base": str(model_dir.resolve()), "data": data, "chat_template": tokenizer.chat_template,
                "packing": packing, "drop_long": drop_long}
    if context is not None:
        settings.update(context=cfg.max_seq_len, rope_scaling=cfg.rope_scaling.to_dict())
    weights = {k: v.float() for k, v in model.state_dict().items()}
    return Finetune(model_cfg=cfg, weights=weights, tokenizer=tokenizer, chat=fmt, packing=packing,
                    drop_long=drop_long, settings=settings)
