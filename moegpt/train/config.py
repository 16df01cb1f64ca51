"""TrainConfig: the optimisation and bookkeeping settings of a run (the model shape is ModelConfig)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moegpt.config import field_differences

# Fields that change only bookkeeping, not the numbers a run computes: they may differ on resume.
# (Activation checkpointing recomputes the same numbers.)
BOOKKEEPING = frozenset({"eval_every", "eval_sequences", "ckpt_every", "keep_checkpoints", "log_every", "peak_flops",
                         "activation_checkpointing"})


def option(default, help: str):
    """A field with the help text of its command-line flag (``moegpt train --FIELD-NAME``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every field is a ``moegpt train`` flag (train/cli.py generates them from this class)."""

    steps: int = option(600, "optimizer steps of the run")
    seq_len: int = option(128, "tokens per training sequence")
    batch_size: int = option(16, "sequences per optimizer step once the ramp is done")
    micro_batch: int = option(16, "sequences per forward/backward (batch_size / micro_batch accumulation steps)")
    batch_start: int | None = option(None, "sequences per step at the start of the ramp (default: no ramp)")
    ramp_tokens: int = option(0, "tokens over which the batch ramps from batch_start to batch_size")
    lr: float = option(3e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate of the cosine decay, as a fraction of lr")
    warmup_steps: int = option(30, "steps of linear warm-up")
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices (norm scales: none)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient's global norm to this")
    aux_loss_coef: float = option(0.01, "Switch load-balancing loss weight")
    z_loss_coef: float = option(1e-3, "router z-loss weight (ST-MoE)")
    bf16: bool = option(False, "bf16 autocast for forward and backward")
    activation_checkpointing: bool = option(False, "recompute each layer in the backward pass: it keeps only its "
                                                   "input (less memory at long contexts, one more forward)")
    seed: int = option(0, "seed of the weights and the data order")
    val_fraction: float = option(0.05, "share of each source held out for validation")
    eval_every: int = option(100, "validate every this many steps")
    eval_sequences: int | None = option(None, "validation sequences per source (default: the whole validation split)")
    ckpt_every: int = option(100, "checkpoint every this many steps")
    keep_checkpoints: int = option(2, "checkpoints kept (the newest)")
    log_every: int = option(1, "log a row every this many steps")
    peak_flops: float | None = option(None, "peak FLOP/s for MFU (default: measured on this machine at start)")

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "micro_batch", "eval_every", "ckpt_every",
                     "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.batch_size % self.micro_batch != 0:
            raise ValueError(f"batch_size ({self.batch_size}) is not a multiple of micro_batch ({self.micro_batch})")
        if self.batch_start is not None and not 0 < self.batch_start <= self.batch_size:
            raise ValueError(f"batch_start={self.batch_start} must be in [1, batch_size={self.batch_size}]")
        if self.batch_start is not None and self.batch_start % self.micro_batch != 0:
            raise ValueError(f"batch_start ({self.batch_start}) is not a multiple of micro_batch ({self.micro_batch})")
        if self.warmup_steps < 0 or self.ramp_tokens < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) and ramp_tokens ({self.ramp_tokens}) must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.weight_decay < 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"weight_decay ({self.weight_decay}) must be >= 0 and betas ({self.beta1}, {self.beta2}) in [0, 1)")
        if self.grad_clip <= 0 or self.lr <= 0:
            raise ValueError(f"lr ({self.lr}) and grad_clip ({self.grad_clip}) must be positive")
        if self.eval_sequences is not None and self.eval_sequences <= 0:
            raise ValueError(f"eval_sequences={self.eval_sequences} must be positive or None")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Fields that change the computation and differ, as 'name: self -> other'."""
        return field_differences(self.to_dict(), other.to_dict(), ignore=BOOKKEEPING)
