"""Pipeline parallelism with ``torch.distributed.pipelining``: the model cut into stages of whole
layers, run by a GPipe, 1F1B or interleaved-1F1B schedule.

Legend: M sequences per micro-batch, T tokens, D d_model, V vocab, Lm MoE layers of the whole model.

Stage 0 holds the embedding (and may hold fewer layers: ``first_stage_layers``, as the article gives
the embedding stage fewer layers); the last stage holds the final norm and the head. Each stage keeps
the model's own parameter names (``layers.7.attn.wq.weight``), so checkpoints do not depend on the cut.

The MoE losses cross the pipeline as an activation: every stage passes ``aux`` (2,) = [sum of the
load-balancing losses, sum of the z-losses] of the MoE layers so far, and adds its own; the loss
function on the last stage divides by Lm, which is the model's mean over MoE layers. Gradients reach
every router through the stage boundaries like any other activation's.
"""

from __future__ import annotations

import torch
from torch import nn

from moegpt.model import MoEGPT
from moegpt.model.rope import rope_cos_sin
from moegpt.parallel.dims import ParallelDims, Schedule, stage_layers


class StageModule(nn.Module):
    """Layers ``[first, last)`` of a MoEGPT; the embedding on stage 0, the head on the last stage.

    forward: stage 0 takes tokens (M, T); later stages take (x (M, T, D), aux (2,)). The last stage
    returns (logits (M, T, V), aux), the others (x, aux). The expert counts of each forward are kept
    in ``counts`` ((Lm_stage, E) per micro-batch, in order) for the step to read."""

    def __init__(self, model: MoEGPT, first: int, last: int, is_first: bool, is_last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.embed = model.embed if is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(first, last)})
        self.norm = model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        if is_last and model.lm_head is None:
            raise ValueError("pipeline parallelism needs untied embeddings (tie_embeddings=false)")
        self.counts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None):
        if self.embed is not None:
            x = self.embed(x)  # (M, T, D)
            aux = x.new_zeros(2)
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling, T)  # (T, Dh)
        counts = []
        for layer in self.layers.values():
            x, s = layer(x, cos, sin, positions)
            if s is not None:
                aux = aux + torch.stack([s.aux_loss, s.z_loss])
                counts.append(s.expert_counts)
        if counts:
            self.counts.append(torch.stack(counts))
        if self.norm is not None:
            x = self.norm(x)
            return self.lm_head(x), aux  # (M, T, V)
        return x, aux


def stage_ids(dims: ParallelDims, pp_rank: int) -> list[int]:
    """The stages this pipeline rank runs: one, or ``virtual_stages`` looped (rank r: r, r+pp, ...)."""
    return [pp_rank + v * dims.pp for v in range(dims.virtual_stages)]


def split_stages(model: MoEGPT, dims: ParallelDims, pp_rank: int) -> list[StageModule]:
    sizes = stage_layers(model.cfg.n_layers, dims.n_stages, dims.first_stage_layers)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [StageModule(model, bounds[s], bounds[s + 1], s == 0, s == dims.n_stages - 1)
            for s in stage_ids(dims, pp_rank)]


def build_schedule(modules: list[StageModule], dims: ParallelDims, pp_rank: int, n_microbatches: int,
                   loss_fn, pp_group, device: torch.device):
    """A schedule over this rank's stages for ``n_microbatches`` micro-batches (gradients not scaled:
    the loss function weights each micro-batch itself)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    stages = [PipelineStage(m, s, dims.n_stages, device, group=pp_group)
              for m, s in zip(modules, stage_ids(dims, pp_rank))]
    if dims.schedule == Schedule.INTERLEAVED_1F1B:
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if dims.schedule == Schedule.GPIPE else Schedule1F1B
    return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
