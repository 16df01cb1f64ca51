"""One optimizer step: gradient accumulation over micro-batches, the MoE losses, clipping.

Legend: B sequences in the step, M micro-batch, T seq_len, V vocab, Lm MoE layers, E experts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegpt.model import MoEGPT


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    aux: float  # load-balancing loss
    z: float  # router z-loss


@dataclass(kw_only=True)
class StepMetrics:
    loss: float  # cross-entropy of the next token (nats)
    aux_loss: float
    z_loss: float
    grad_norm: float
    expert_counts: torch.Tensor  # (Lm, E) assignments summed over the step

    @property
    def load_imbalance(self) -> float:
        """Busiest expert's load over the mean load, averaged over MoE layers (1.0 is balanced)."""
        if self.expert_counts.numel() == 0:
            return 1.0
        c = self.expert_counts.float()
        return float((c.max(dim=1).values / c.mean(dim=1).clamp(min=1e-9)).mean())


def autocast_context(bf16: bool, device_type: str):
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(model: MoEGPT, optimizer: torch.optim.Optimizer, batch: torch.Tensor, micro_batch: int,
               weights: LossWeights, grad_clip: float, bf16: bool = False) -> StepMetrics:
    """batch (B, T+1) token blocks; inputs are [:, :-1], targets [:, 1:]."""
    B = batch.shape[0]
    optimizer.zero_grad(set_to_none=True)
    ce_sum = aux_sum = z_sum = 0.0
    counts = None
    for start in range(0, B, micro_batch):
        chunk = batch[start:start + micro_batch]
        n = chunk.shape[0]
        with autocast_context(bf16, chunk.device.type):
            out = model(chunk[:, :-1])
        logits = out.logits.float()  # (M, T, V)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        loss = ce + weights.aux * out.aux_loss + weights.z * out.z_loss
        (loss * (n / B)).backward()  # the mean over the whole step, whatever the micro-batch
        ce_sum += ce.item() * n
        aux_sum += out.aux_loss.item() * n
        z_sum += out.z_loss.item() * n
        c = out.expert_counts if out.router else torch.zeros(0, 0, dtype=torch.long)
        counts = c if counts is None else counts + c
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return StepMetrics(loss=ce_sum / B, aux_loss=aux_sum / B, z_loss=z_sum / B, grad_norm=float(grad_norm),
                       expert_counts=counts)


@torch.no_grad()
def evaluate(model: MoEGPT, batches, bf16: bool = False) -> tuple[float, int]:
    """(summed next-token cross-entropy, target count) over ``batches`` of (B, T+1) blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast_context(bf16, batch.device.type):
            logits = model(batch[:, :-1]).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total, count
