"""One optimizer step: gradient accumulation over micro-batches, the MoE losses, clipping.

A step's batch is pre-training blocks (B, T+1), every token a target, packed fine-tuning rows
(data/sft.py: PackedBatch), whose targets are the assistant's tokens only, or image conversations
(data/vision_data.py: VisionBatch) for a vision model, whose targets are the answers' tokens. Either way the
cross-entropy is normalised over the targets of the whole step, not of each micro-batch, so
accumulating micro-batches gives the gradient of one large batch.

Legend: B sequences in the step, M micro-batch, T seq_len, V vocab, Lm MoE layers, E experts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegpt.data.sft import IGNORE, PackedBatch
from moegpt.data.vision_data import VisionBatch
from moegpt.model import MoEGPT, ModelOutput
from moegpt.model.attention import DocumentMask


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


def document_views(model, rows: PackedBatch) -> list[DocumentMask]:
    """One attention view per layer that keeps each packed conversation to itself."""
    layers = getattr(model, "module", model).cfg.n_layers  # (a DDP-wrapped model's own model)
    return [DocumentMask.of(rows.docs)] * layers


def packed_forward(model: MoEGPT, rows: PackedBatch) -> ModelOutput:
    """The model over packed rows: positions restart at each conversation, attention stays inside it."""
    return model(rows.inputs, rows.positions, document_views(model, rows))


def packed_target_forward(model: MoEGPT, rows: PackedBatch) -> tuple[ModelOutput, torch.Tensor]:
    """``packed_forward`` with the output head only where a row has a target: logits (N, V) and their
    targets (N,). Fine-tuning's targets are the assistant's tokens, a small share of each row, and the
    head (a (V, D) product and a V-way softmax per position) is otherwise a third of the step's work."""
    x, stats = model.trunk(rows.inputs, rows.positions, document_views(model, rows))  # (M, T, D)
    keep = rows.targets != IGNORE  # (M, T)
    return ModelOutput(logits=model.head(x[keep]), router=stats), rows.targets[keep]


def image_forward(model, rows: VisionBatch) -> ModelOutput:
    """A vision model (model/vision) over image conversations: each image encoded once, each token
    cross-attending to the most recent image before it."""
    return model(rows.inputs, pixels=rows.pixels, locations=rows.locations)


def _forward(model: MoEGPT, chunk: torch.Tensor | PackedBatch | VisionBatch) -> tuple[ModelOutput, torch.Tensor]:
    """A micro-batch -> the model's output and its targets (M, T) (IGNORE outside the loss); for
    packed rows through a plain model, the logits and targets of the target positions alone (N,)."""
    if isinstance(chunk, PackedBatch):
        if isinstance(model, MoEGPT):
            return packed_target_forward(model, chunk)
        return packed_forward(model, chunk), chunk.targets
    if isinstance(chunk, VisionBatch):
        return image_forward(model, chunk), chunk.targets
    return model(chunk[:, :-1]), chunk[:, 1:]


def num_targets(batch: torch.Tensor | PackedBatch | VisionBatch) -> int:
    return batch[:, 1:].numel() if isinstance(batch, torch.Tensor) else batch.num_targets


def train_step(model: MoEGPT, optimizer: torch.optim.Optimizer, batch: torch.Tensor | PackedBatch, micro_batch: int,
               weights: LossWeights, grad_clip: float, bf16: bool = False) -> StepMetrics:
    """batch: blocks (B, T+1), inputs [:, :-1] and targets [:, 1:]; or packed rows (B of them)."""
    B = len(batch)
    total = num_targets(batch)
    if total == 0:
        raise ValueError("the step's rows hold no loss target (no assistant token): nothing to learn from")
    optimizer.zero_grad(set_to_none=True)
    ce_sum = aux_sum = z_sum = 0.0
    counts = None
    for start in range(0, B, micro_batch):
        chunk = batch[start:start + micro_batch] if isinstance(batch, torch.Tensor) else batch.rows(start, start + micro_batch)
        n = len(chunk)
        with autocast_context(bf16, chunk_device(chunk).type):
            out, targets = _forward(model, chunk)
        logits = out.logits.float()  # (M, T, V) or (N, V)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                             reduction="sum")
        # the mean over the whole step's targets, whatever the micro-batch; the router losses per row
        loss = ce / total + (weights.aux * out.aux_loss + weights.z * out.z_loss) * (n / B)
        loss.backward()
        ce_sum += ce.item()
        aux_sum += out.aux_loss.item() * n
        z_sum += out.z_loss.item() * n
        c = out.expert_counts if out.router else torch.zeros(0, 0, dtype=torch.long)
        counts = c if counts is None else counts + c
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return StepMetrics(loss=ce_sum / total, aux_loss=aux_sum / B, z_loss=z_sum / B, grad_norm=float(grad_norm),
                       expert_counts=counts)


def chunk_device(chunk: torch.Tensor | PackedBatch | VisionBatch) -> torch.device:
    return chunk.device if isinstance(chunk, torch.Tensor) else chunk.inputs.device


@torch.no_grad()
def evaluate(model: MoEGPT, batches, bf16: bool = False) -> tuple[float, int]:
    """(summed next-token cross-entropy, target count) over ``batches`` of (B, T+1) blocks or packed rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast_context(bf16, chunk_device(batch).type):
            out, targets = _forward(model, batch)
        logits = out.logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += num_targets(batch)
    model.train(was_training)
    return total, count
