"""One distributed optimizer step with the numbers of one process (the trainer's step in any
torchrun layout; the parallel model comes from moegpt.parallel, which knows nothing of training).

Legend: B sequences in the step, M micro-batch, T seq_len, R = dp x ep data ranks, Lm MoE layers, E experts.

Every rank holds the whole global batch (B, T+1) blocks, or B packed fine-tuning rows (data/sft.py:
PackedBatch; every layout but a pipeline), and takes whole micro-batches of it: micro-batch i
goes to data rank i mod R. A micro-batch is never split, because the load-balancing loss of an MoE
layer is not a sum over sequences: it is computed over exactly the tokens one process would see.
Each micro-batch's loss is weighted M/B (packed rows: its cross-entropy summed and divided by
the whole step's targets, as train_step does), so the gradients summed over ranks are the
one-process gradient. Ranks left with fewer micro-batches (B/M not a multiple of R) run padding micro-batches
whose targets are all ignored and whose weight is 0: the collectives of EP, DDP and FSDP still match.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moegpt.data.sft import IGNORE, PackedBatch  # IGNORE: also the targets of a padding micro-batch
from moegpt.parallel import ParallelModel
from moegpt.parallel.dims import DataParallel
from moegpt.parallel.fsdp import all_reduce_grads, local_tensor
from moegpt.data.vision_data import VisionBatch
from moegpt.train.step import LossWeights, StepMetrics, autocast_context, image_forward, num_targets, packed_forward


def microbatch_loss(logits: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, targets: torch.Tensor,
                    weights: LossWeights, scale: float, parts: list, ce_weight: float | None = None,
                    real: bool | None = None) -> torch.Tensor:
    """The loss of one micro-batch times ``scale``; 0 for a padding one (``real`` False; None: a
    padding one is told by its ignored targets). Appends (ce, aux, z, real). ``ce_weight``: the
    summed cross-entropy times this instead (packed rows: 1 / the whole step's targets, times the
    data ranks' factor), so micro-batches with different numbers of targets weigh as one batch."""
    if real is None:
        real = bool((targets[:, 0] != IGNORE).all())
    V = logits.shape[-1]
    ce_sum = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    router = weights.aux * aux + weights.z * z
    if ce_weight is None:
        ce = ce_sum / targets.numel()
        parts.append((ce.detach(), aux.detach(), z.detach(), real))
        loss = (ce + router) * scale
    else:
        parts.append((ce_sum.detach(), aux.detach(), z.detach(), real))
        loss = ce_sum * ce_weight + router * scale
    return loss * (1.0 if real else 0.0)


def _assignments(pm: ParallelModel, n_micro: int) -> list[int | None]:
    """This rank's micro-batch indices, one per round; None for a padding round."""
    R, r = pm.dims.batch_ranks, pm.batch_rank
    rounds = -(-n_micro // R)
    if pm.dims.pp > 1:  # schedules want at least one micro-batch per pipeline rank, in whole rounds
        rounds = max(pm.dims.pp, -(-rounds // pm.dims.pp) * pm.dims.pp)
    return [i * R + r if i * R + r < n_micro else None for i in range(rounds)]


def _sync(pm: ParallelModel, last: bool):
    """Skip the data-parallel gradient reduction on all but the last micro-batch."""
    mode = pm.dims.data_parallel
    if pm.reduces_in_backward and mode != DataParallel.FSDP and not last:
        return pm.module.no_sync()  # DDP
    if mode == DataParallel.FSDP:
        pm.module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def distributed_train_step(pm: ParallelModel, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                           micro_batch: int, weights: LossWeights, grad_clip: float,
                           n_moe_layers: int, n_experts: int, schedules: dict | None = None,
                           bf16: bool = False) -> StepMetrics:
    """batch (B, T+1) blocks or B packed rows, the same on every rank -> the step's metrics, the same
    on every rank."""
    dims = pm.dims
    packed = isinstance(batch, (PackedBatch, VisionBatch))  # rows whose targets are some of their tokens
    if packed and dims.pp > 1:
        raise ValueError("packed fine-tuning rows do not run through a pipeline yet (--pp 1)")
    B, M = len(batch), micro_batch
    device = batch.inputs.device if packed else batch.device
    mine = _assignments(pm, B // M)
    # DDP averages gradients over dp; undo that so the ranks' gradients sum.
    ranks = dims.dp if pm.reduces_in_backward else 1
    scale = M / B * ranks
    total = num_targets(batch)
    if total == 0:
        raise ValueError("the step's rows hold no loss target (no assistant token): nothing to learn from")
    ce_weight = ranks / total if packed else None
    chunks = []
    for i in mine:
        first = (i if i is not None else 0) * M
        if packed:
            rows = batch.rows(first, first + M)
            chunks.append((rows, rows.targets))
            continue
        chunk = batch[first:first + M]
        inp, tgt = chunk[:, :-1], chunk[:, 1:].clone()
        if i is None:
            tgt.fill_(IGNORE)
        chunks.append((inp, tgt))
    for p in pm.parameters():  # (ZeRO-1's optimizer holds local shards, not these parameters)
        p.grad = None
    parts: list = []
    counts = torch.zeros(n_moe_layers, n_experts, dtype=torch.long, device=device)
    if dims.pp > 1:
        with autocast_context(bf16, device.type):
            _pipeline_step(pm, chunks, weights, scale, parts, counts, n_moe_layers, schedules)
    else:
        for k, (inp, tgt) in enumerate(chunks):
            with _sync(pm, last=k == len(chunks) - 1):
                with autocast_context(bf16, device.type):
                    out = (image_forward(pm.module, inp) if isinstance(inp, VisionBatch) else
                           packed_forward(pm.module, inp) if packed else pm.module(inp))
                loss = microbatch_loss(out.logits, out.aux_loss, out.z_loss, tgt, weights, scale, parts, ce_weight,
                                       real=mine[k] is not None)
                loss.backward()
            if mine[k] is not None and out.router:
                counts += out.expert_counts
    params = [p for p in pm.parameters() if p.requires_grad]  # (a vision run's frozen text model: none)
    for p in params:  # every rank must bring every gradient to the reductions below
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not pm.reduces_in_backward and dims.data_parallel != DataParallel.FSDP:
        from moegpt.parallel.expert import is_expert_param

        named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
        expert = [p for n, p in named if is_expert_param(n) and dims.ep > 1]
        dense = [p for n, p in named if not (is_expert_param(n) and dims.ep > 1)]
        all_reduce_grads(dense, pm.batch_group)
        all_reduce_grads(expert, pm.dp_group)
    grad_norm = _clip(pm, params, grad_clip)
    optimizer.step()

    # Metrics: sums over the real micro-batches of every data rank (TP ranks hold copies: / tp).
    real = [(ce, a, z) for ce, a, z, is_real in parts if is_real]
    sums = torch.tensor([sum(float(v[j]) for v in real) * M for j in range(3)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    sums, counts = sums / dims.tp, counts // dims.tp
    loss = float(sums[0]) / M / total if packed else float(sums[0]) / B  # (packed parts are summed, not means)
    return StepMetrics(loss=loss, aux_loss=float(sums[1]) / B, z_loss=float(sums[2]) / B,
                       grad_norm=grad_norm, expert_counts=counts.cpu())


def _clip(pm: ParallelModel, params: list[torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ over the whole model: each shard's squares counted once across all ranks."""
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        sq += local_tensor(p.grad).double().pow(2).sum() / pm.replicas(p)
    dist.all_reduce(sq)
    total = float(sq.sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            local_tensor(p.grad).mul_(coef)
    return total


def _pipeline_step(pm: ParallelModel, chunks, weights: LossWeights, scale: float, parts: list,
                   counts: torch.Tensor, n_moe_layers: int, schedules: dict | None) -> None:
    from moegpt.parallel.pipeline import build_schedule

    seen: list = []  # the first step of a schedule also runs a shape-inference pass: keep the last n

    def loss_fn(output, target):
        logits, aux = output
        return microbatch_loss(logits, aux[0] / n_moe_layers, aux[1] / n_moe_layers, target, weights, scale, seen)

    n = len(chunks)
    schedules = {} if schedules is None else schedules
    if n not in schedules:
        schedules[n] = build_schedule(pm.stages, pm.dims, pm.pp_rank, n, loss_fn, pm.pp_group, chunks[0][0].device)
    schedule = schedules[n]
    schedule._loss_fn = loss_fn  # this step's closure (weights, parts); schedules are reused across steps
    for stage in pm.stages:
        stage.counts.clear()
    inputs = torch.cat([c[0] for c in chunks])
    targets = torch.cat([c[1] for c in chunks])
    schedule.step(inputs, target=targets)
    parts.extend(seen[-n:] if seen else [])
    # Each stage's counts, micro-batch by micro-batch, into the rows of its MoE layers.
    cfg = pm.stages[0].cfg
    moe_row = {layer: row for row, layer in enumerate(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))}
    for stage in pm.stages:
        rows = [moe_row[int(k)] for k in stage.layers.keys() if int(k) in moe_row]
        for c, t in zip(stage.counts[-n:], chunks):
            if bool((t[1][:, 0] != IGNORE).all()):
                counts[rows] += c


@torch.no_grad()
def pipeline_evaluate(pm: ParallelModel, blocks: torch.Tensor, micro_batch: int, schedules: dict,
                      bf16: bool = False) -> tuple[float, int]:
    """(summed next-token cross-entropy, target count) of ``blocks`` (N, T+1) through the pipeline,
    on every rank. Blocks go in whole rounds of pp micro-batches of the training shape (the stages'
    buffers have that shape); the rows that fill the last round have every target ignored."""
    from moegpt.parallel.pipeline import build_schedule

    n, M = pm.dims.pp, micro_batch
    rows = n * M
    sums = torch.zeros(2, dtype=torch.float64, device=blocks.device)  # [nll, targets]

    def loss_fn(output, target):
        logits, _ = output
        V = logits.shape[-1]
        nll = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        sums[0] += nll.double()
        sums[1] += (target != IGNORE).sum()
        return nll

    if n not in schedules:
        schedules[n] = build_schedule(pm.stages, pm.dims, pm.pp_rank, n, loss_fn, pm.pp_group, blocks.device)
    schedule = schedules[n]
    schedule._loss_fn = loss_fn
    for first in range(0, blocks.shape[0], rows):
        chunk = blocks[first:first + rows]
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        if chunk.shape[0] < rows:  # fill the round
            fill = rows - chunk.shape[0]
            inputs = torch.cat([inputs, inputs.new_zeros(fill, inputs.shape[1])])
            targets = torch.cat([targets, targets.new_full((fill, targets.shape[1]), IGNORE)])
        with autocast_context(bf16, blocks.device.type):
            schedule.eval(inputs, target=targets)
    for stage in pm.stages:
        stage.counts.clear()
    dist.all_reduce(sums, group=pm.pp_group)  # only the last stage computed them
    return float(sums[0]), int(sums[1])
