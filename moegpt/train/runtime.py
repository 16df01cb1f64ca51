"""Where the training loop runs: one process, or one rank of a torchrun layout.

The trainer (trainer.py) is written once; what differs between one process and a layout is how the
model is built and stepped, how validation batches go through it, and how checkpoints are written.
A runtime holds exactly that:

- ``LocalRuntime``: the plain model, ``train_step``, and a ``state.pt`` checkpoint
  (checkpoint/store.py) holding everything, RNG state included.
- ``DistributedRuntime``: ``parallelize(model, dims, mesh)``, the distributed step (parallel_step.py),
  DCP checkpoints whose shards reshard into any layout (parallel/checkpoint.py), and collectives
  for the few things ranks must agree on (a stop request, the per-rank metrics of a row).

One process is the degenerate layout: both runtimes draw the same global batch from the same
sampler and compute the same numbers, which the parity tests check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch

from moegpt.checkpoint import store
from moegpt.config import ModelConfig
from moegpt.model import MoEGPT, build_model
from moegpt.train.activations import SavedActivations, checkpoint_layers, peak_rss_mib, reset_peak_rss
from moegpt.train.config import TrainConfig
from moegpt.train.optim import make_optimizer, make_parallel_optimizer
from moegpt.train.parallel_step import distributed_train_step, pipeline_evaluate
from moegpt.train.step import LossWeights, StepMetrics, evaluate, train_step

T = TypeVar("T")


def loss_weights(cfg: TrainConfig) -> LossWeights:
    return LossWeights(aux=cfg.aux_loss_coef, z=cfg.z_loss_coef)


class LocalRuntime:
    """One process, no process group."""

    rank, world_size, restarted = 0, 1, False
    device = torch.device("cpu")

    def __init__(self):
        self._loaded: dict | None = None  # the checkpoint read by read_train_state, for restore

    @property
    def is_main(self) -> bool:
        return True

    def barrier(self) -> None:
        pass

    def any_rank(self, flag: bool) -> bool:
        return flag

    def main_first(self, fn: Callable[[], T]) -> T:
        return fn()

    # ---- model ----------------------------------------------------------------------------------
    def build(self, model_cfg: ModelConfig, cfg: TrainConfig, weights: dict[str, torch.Tensor] | None = None,
              make_model: Callable[[int], torch.nn.Module] | None = None) -> None:
        """The model (initialised by the seed, or given ``weights``: a fine-tuning run's start; or
        ``make_model(seed)``'s: a vision run's) and its optimizer."""
        self.model_cfg, self.cfg = model_cfg, cfg
        if make_model is not None:
            self.model = make_model(cfg.seed)
        else:
            self.model = build_model(model_cfg, seed=cfg.seed)
            if weights is not None:
                self.model.load_state_dict(weights)
        self.model.train()
        if cfg.activation_checkpointing:
            checkpoint_layers(self.model)
        self.optimizer = make_optimizer(self.model, cfg)
        self._memory: dict = {}

    def step(self, batch: torch.Tensor) -> StepMetrics:
        """batch (B, T+1) -> the step's metrics; its memory (peak resident, activations kept per
        micro-batch) for the log row."""
        cfg = self.cfg
        reset_peak_rss()
        with SavedActivations(self.model) as saved:
            metrics = train_step(self.model, self.optimizer, batch, cfg.micro_batch, loss_weights(cfg), cfg.grad_clip,
                                 cfg.bf16)
        micro_batches = -(-len(batch) // cfg.micro_batch)
        self._memory = {"peak_rss_mib": round(peak_rss_mib(), 1),
                        "activation_mib": round(saved.bytes / micro_batches / 2**20, 2)}
        return metrics

    def evaluate(self, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
        return evaluate(self.model, batches, self.cfg.bf16)

    def row_fields(self, metrics: StepMetrics) -> dict:
        return dict(self._memory)

    def final_model(self) -> MoEGPT | None:
        return self.model

    # ---- checkpoints ------------------------------------------------------------------------------
    def latest_checkpoint(self, root: Path) -> Path | None:
        return store.latest_checkpoint(root)

    def read_train_state(self, path: Path) -> dict:
        self._loaded = store.load_checkpoint(path)
        return self._loaded

    def restore(self, path: Path) -> None:
        ckpt = self._loaded if self._loaded is not None else store.load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self._loaded = None

    def save_checkpoint(self, root: Path, step: int, train_state: dict, keep: int) -> Path:
        state = {**train_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}}
        return store.save_checkpoint(root, step, state, keep=keep)


class DistributedRuntime:
    """One rank of a torchrun layout; the process group is already joined (parallel/process_group.py)."""

    def __init__(self, dims, device: torch.device):
        import torch.distributed as dist

        from moegpt.parallel.process_group import restart_count

        self.dims, self.device = dims, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.restarted = restart_count() > 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is on any (a signal may reach the ranks in different steps)."""
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def main_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn`` first (it fills the caches: tokenizer, token files), then the others."""
        result = None
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                result = fn()
            self.barrier()
        return result

    # ---- model ----------------------------------------------------------------------------------
    def build(self, model_cfg: ModelConfig, cfg: TrainConfig, weights: dict[str, torch.Tensor] | None = None,
              make_model: Callable[[int], torch.nn.Module] | None = None) -> None:
        from moegpt.parallel import parallelize

        self.model_cfg, self.cfg, self.make_model = model_cfg, cfg, make_model
        self.mesh = self.dims.build_mesh(self.device.type)
        if make_model is not None:  # a vision run: data parallel only (train/cli.py checks the layout)
            model = make_model(cfg.seed).to(self.device)
        else:
            model = build_model(model_cfg, device=self.device, seed=cfg.seed)  # the same weights on every rank
            if weights is not None:
                model.load_state_dict(weights)
        model.train()
        if cfg.activation_checkpointing:
            checkpoint_layers(model)
        self.pm = parallelize(model, self.dims, self.mesh)
        self.optimizer = make_parallel_optimizer(self.pm, cfg)
        self.schedules: dict = {}  # pipeline schedules by micro-batch count, reused across steps

    def step(self, batch: torch.Tensor) -> StepMetrics:
        """batch (B, T+1), the same on every rank -> the step's metrics, the same on every rank."""
        cfg, mc = self.cfg, self.model_cfg
        return distributed_train_step(self.pm, self.optimizer, batch.to(self.device), cfg.micro_batch,
                                      loss_weights(cfg), cfg.grad_clip, mc.n_moe_layers, mc.n_experts,
                                      self.schedules, bf16=cfg.bf16)

    def evaluate(self, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
        """Every rank runs every batch (so the collectives of TP/EP/FSDP match); a pipeline evaluates
        through its schedule."""
        if self.pm.module is None:
            return pipeline_evaluate(self.pm, torch.cat(list(batches)).to(self.device), self.cfg.micro_batch,
                                     self.schedules, self.cfg.bf16)
        return evaluate(self.pm.module, (b.to(self.device) for b in batches), self.cfg.bf16)

    def row_fields(self, metrics: StepMetrics) -> dict:
        """The layout's own log fields: per-expert load across EP ranks (the share of the step's
        assignments each EP rank computed) and every rank's peak memory."""
        import torch.distributed as dist

        from moegpt.parallel.process_group import peak_memory_mb

        ep = self.dims.ep
        per_expert = metrics.expert_counts.sum(0) if metrics.expert_counts.numel() else torch.zeros(ep)
        per_rank = per_expert.view(ep, -1).sum(1).double()
        peaks = [None] * self.world_size
        dist.all_gather_object(peaks, round(peak_memory_mb(self.device), 1))
        return {"layout": self.dims.describe(), "world_size": self.world_size,
                "ep_load": [round(float(x), 4) for x in per_rank / per_rank.sum().clamp(min=1)],
                "expert_counts": per_expert.tolist(), "peak_mem_mb": peaks}

    def final_model(self) -> MoEGPT | None:
        """The whole model on rank 0 (None elsewhere); every rank must call it (it gathers)."""
        from moegpt.parallel.checkpoint import full_state_dict

        weights = full_state_dict(self.pm)
        if weights is None:
            return None
        if self.make_model is not None:
            model = self.make_model(self.cfg.seed)
            model.load_state_dict(weights)
            return model
        model = build_model(self.model_cfg, device="meta")
        model.load_state_dict(weights, assign=True)
        return model

    # ---- checkpoints ------------------------------------------------------------------------------
    def latest_checkpoint(self, root: Path) -> Path | None:
        from moegpt.parallel import checkpoint as dcp_store

        return dcp_store.latest(root)

    def read_train_state(self, path: Path) -> dict:
        from moegpt.parallel import checkpoint as dcp_store

        return dcp_store.read_train_state(path)

    def restore(self, path: Path) -> None:
        from moegpt.parallel import checkpoint as dcp_store

        dcp_store.load(path, self.pm, self.optimizer)

    def save_checkpoint(self, root: Path, step: int, train_state: dict, keep: int) -> Path:
        from dataclasses import asdict

        from moegpt.parallel import checkpoint as dcp_store

        layout = {k: getattr(v, "value", v) for k, v in asdict(self.dims).items()}
        return dcp_store.save(root, step, self.pm, self.optimizer, {**train_state, "layout": layout}, keep=keep)
