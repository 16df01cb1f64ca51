"""What a vision training run adds to the trainer (Flamingo's recipe, as the article says GPT-4's
vision was added): a trained text model directory, an image tower (fresh, or a CLIP / SigLIP
vision directory), a new resampler and gated cross-attention blocks, and which parts train.

``moegpt train-vision --model DIR --out DIR`` builds one of these and runs the one training loop
(trainer.py) over data/vision_data's generated image conversations. By default the language model
is frozen (its weights come out bit-identical) and the tower, resampler and gated blocks train;
``--freeze-tower`` keeps a loaded tower fixed too, ``--train-text`` unfreezes the language model.
The settings are recorded in ``OUT/vision_training.json`` and in every checkpoint (a resume with
other settings is refused); the output is a vision model directory (checkpoint/vision_dir.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moegpt.atomic import write_text_atomic
from moegpt.checkpoint.vision_hf import load_tower
from moegpt.config import ModelConfig
from moegpt.data.chat import ChatFormat
from moegpt.data.images import ImageProcessing
from moegpt.data.tokenizer import IMAGE, Tokenizer
from moegpt.model import build_model
from moegpt.model.vision.vision_model import VisionMoEGPT, add_vision
from moegpt.train.finetune import read_chat_model
from moegpt.vision_config import VisionConfig, tower_preset


@dataclass(frozen=True, kw_only=True)
class VisionTraining:
    model_cfg: ModelConfig  # the text model's
    weights: dict[str, torch.Tensor]  # the text model's parameters (fp32)
    vision_cfg: VisionConfig
    tower_weights: dict[str, torch.Tensor] | None  # a loaded tower's; None: a fresh one
    tokenizer: Tokenizer
    chat: ChatFormat
    processing: ImageProcessing
    train_tower: bool
    train_text: bool
    settings: dict  # what the run records
    # the tower's and resampler's weights after pre-training them on their own (vision_pretrain.py),
    # by part; None: as add_vision initialises them (or as loaded)
    image_weights: dict[str, dict[str, torch.Tensor]] | None = None

    def record(self, out: Path) -> None:
        write_text_atomic(out / "vision_training.json", json.dumps(self.settings, indent=2) + "\n")

    def make_model(self, seed: int) -> VisionMoEGPT:
        """The text model with these weights joined to the vision part (fresh parts from ``seed``);
        the frozen parts' ``requires_grad`` off."""
        text = build_model(self.model_cfg, seed=seed)
        text.load_state_dict(self.weights)
        tower = None
        if self.tower_weights is not None:
            from moegpt.model.vision.tower import VisionTower

            tower = VisionTower(self.vision_cfg.tower)
            tower.load_state_dict(self.tower_weights)
        model = add_vision(text, self.vision_cfg, tower=tower, seed=seed)
        for part, weights in (self.image_weights or {}).items():
            getattr(model, part).load_state_dict(weights)
        freeze(model, train_text=self.train_text, train_tower=self.train_tower)
        return model


def freeze(model: VisionMoEGPT, *, train_text: bool, train_tower: bool) -> None:
    """Which parts learn: the resampler and the gated blocks always; the tower (less its pooling
    parts, which the features do not pass through) and the text model by choice."""
    parts: dict[str, nn.Module] = {"text": model.text, **model.vision_modules()}
    chosen = {"text": train_text, "tower": train_tower, "resampler": True, "cross_attn": True}
    for name, module in parts.items():
        for p in module.parameters():
            p.requires_grad_(chosen[name])
    for module in model.tower.pooling_modules():  # unused by the features the resampler reads
        for p in module.parameters():
            p.requires_grad_(False)


def vision_inputs(model_dir: str | Path, *, tower: str = "demo", cross_attention_every: int = 1,
                  n_latents: int = 64, freeze_tower: bool = False, train_text: bool = False,
                  chat_template: str | None = None) -> VisionTraining:
    """Read the text model directory and the tower (a preset name, or a CLIP / SigLIP vision
    directory); every mismatch is a one-line error before any work."""
    model_dir = Path(model_dir)
    text, tokenizer, fmt = read_chat_model(model_dir, chat_template, text_only=True)
    if tokenizer.token_to_id(IMAGE) is None:
        raise ValueError(f"--model {model_dir}: its tokenizer has no {IMAGE} token to mark where an image sits")
    tower_path = Path(tower)
    if tower_path.is_dir():
        loaded = load_tower(tower_path, dtype=torch.float32)
        tower_cfg, tower_weights = loaded.cfg, {k: v.detach().clone() for k, v in loaded.state_dict().items()}
        processing = ImageProcessing.load(tower_path, tower_cfg)
    else:
        tower_cfg, tower_weights = tower_preset(tower), None
        processing = ImageProcessing.for_tower(tower_cfg)
    if freeze_tower and tower_weights is None:
        raise ValueError(f"--freeze-tower with the fresh {tower!r} tower would train nothing to see with: "
                         "give --tower a CLIP / SigLIP vision directory")
    vision_cfg = VisionConfig.for_text(text.cfg, tower_cfg, cross_attention_every=cross_attention_every,
                                       n_latents=n_latents)
    settings = {"base": str(model_dir.resolve()), "tower": str(tower_path.resolve()) if tower_path.is_dir() else tower,
                "vision_config": vision_cfg.to_dict(), "train_tower": not freeze_tower, "train_text": train_text,
                "chat_template": tokenizer.chat_template}
    weights = {k: v.float() for k, v in text.state_dict().items()}
    return VisionTraining(model_cfg=text.cfg, weights=weights, vision_cfg=vision_cfg, tower_weights=tower_weights,
                          tokenizer=tokenizer, chat=fmt, processing=processing, train_tower=not freeze_tower,
                          train_text=train_text, settings=settings)
