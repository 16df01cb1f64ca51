"""The distributed training loop: one process per rank under torchrun, any ParallelDims layout.

It reuses the single-process pieces (data mixture and sampler, LR and batch schedules, the run log,
the final model directory) and swaps in the parallel model, the distributed step and DCP checkpoints.

The recipe is the same at any scale: every rank draws the same global batch from the same sampler
(the batch-size ramp and the per-source epoch mixture are functions of the global step and tokens
seen), and the step hands out whole micro-batches, so the global sample order does not depend on
the layout. Checkpoints hold the sampler position, so a run resumed in another layout, or restarted
by torchrun after a failure, continues with the next sample.
"""

from __future__ import annotations

import datetime
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from moegpt.checkpoint.hf import mixtral_incompatibility
from moegpt.config import ModelConfig
from moegpt.counts import train_flops_per_token
from moegpt.data.corpus_tokenizer import corpus_tokenizer
from moegpt.data.dataset import build_mixture
from moegpt.data.sources import Source
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.parallel import ParallelDims, parallelize
from moegpt.parallel import checkpoint as dcp_store
from moegpt.parallel.optim import make_parallel_optimizer
from moegpt.parallel.step import distributed_train_step, pipeline_evaluate
from moegpt.train.config import TrainConfig
from moegpt.train.log import RunLog
from moegpt.train.schedule import BatchRamp, LRSchedule
from moegpt.train.step import LossWeights, evaluate
from moegpt.train.trainer import RunResult, check_resume_compatible


def init_distributed(timeout_s: float = 300.0) -> torch.device:
    """Join the torchrun group: NCCL on GPUs, gloo on CPUs; a timeout so a mismatched collective fails
    in minutes, not the default half hour."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # ranks leave together (a rank that tears down early crashes the others' exit)
        dist.destroy_process_group()


def restart_count() -> int:
    """How many times torchrun has restarted this group after a failure (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class DistributedTrainer:
    """Checks the layout, the inputs and any checkpoint, then builds data, model and optimizer."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, dims: ParallelDims, out: str | Path,
                 sources: Sequence[Source], cache_dir: str | Path, resume: bool = False,
                 device: torch.device = torch.device("cpu"), record_samples: bool = False):
        self.model_cfg, self.cfg, self.dims, self.out = model_cfg, train_cfg, dims, Path(out)
        self.device, self.record_samples = device, record_samples
        self.rank = dist.get_rank()
        dims.validate(dist.get_world_size(), model_cfg)
        if train_cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len ({train_cfg.seq_len}) exceeds the model's max_seq_len ({model_cfg.max_seq_len})")
        reason = mixtral_incompatibility(model_cfg)
        if reason is not None:
            raise ValueError(f"cannot train to a model directory: {reason}")
        self.mixture = [[s.name, s.epochs] for s in sources]
        self.ckpt_dir = self.out / "checkpoints"
        existing = dcp_store.latest(self.ckpt_dir)
        self.resumed_from = None
        if resume:
            if existing is None:
                raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}")
            self.resumed_from = existing
            self.train_state = dcp_store.read_train_state(existing)
            check_resume_compatible(self.train_state, model_cfg, train_cfg, self.mixture, existing)
        elif self.out.exists() and any(self.out.iterdir()) and restart_count() == 0:
            raise ValueError(f"--out {self.out} exists and is not empty; pass --resume to continue a run, or choose another --out")
        dist.barrier()  # every rank has checked the directory before rank 0 writes into it

        # Rank 0 trains the tokenizer and tokenizes the sources (both cached); the others then load them.
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                if resume:
                    self.tokenizer = Tokenizer.load(self.out / "tokenizer.json")
                else:
                    self.tokenizer = corpus_tokenizer(sources, model_cfg.vocab_size, cache_dir)
                self.data = build_mixture(sources, self.tokenizer, train_cfg.seq_len, cache_dir, train_cfg.val_fraction)
            dist.barrier()
        if resume and self.train_state["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
            raise ValueError(f"{self.out / 'tokenizer.json'} is not the tokenizer {existing.name} was trained with")
        if self.tokenizer.vocab_size != model_cfg.vocab_size:
            raise ValueError(f"tokenizer vocab ({self.tokenizer.vocab_size}) != model vocab_size ({model_cfg.vocab_size})")
        self.sampler = self.data.make_sampler(train_cfg.seed)
        self.source_draws = [0] * len(sources)

        torch.manual_seed(train_cfg.seed)
        self.mesh = dims.build_mesh(device.type)
        model = build_model(model_cfg, device=device, seed=train_cfg.seed)  # the same weights on every rank
        model.train()
        self.pm = parallelize(model, dims, self.mesh)
        self.optimizer = make_parallel_optimizer(self.pm, train_cfg)
        self.schedules: dict = {}
        self.lr_at = LRSchedule(train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr_ratio)
        start = train_cfg.batch_start or train_cfg.batch_size
        self.batch_at = BatchRamp(start, train_cfg.batch_size, train_cfg.ramp_tokens, train_cfg.micro_batch)
        self.step, self.tokens_seen = 0, 0
        self.flops_per_token = train_flops_per_token(model_cfg, train_cfg.seq_len)
        if train_cfg.peak_flops is not None:
            self.peak_flops = train_cfg.peak_flops
        else:
            from moegpt.hardware import measure_matmul_flops

            self.peak_flops = measure_matmul_flops(torch.float32, device.type)
        if self.resumed_from is not None:
            self._restore(self.resumed_from)

    # ---- checkpoint state ----------------------------------------------------------------------
    def train_state_dict(self) -> dict:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
            "source_draws": list(self.source_draws), "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(), "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "mixture": self.mixture, "layout": {k: getattr(v, "value", v) for k, v in asdict(self.dims).items()},
        }

    def _restore(self, path: Path) -> None:
        state = dcp_store.load(path, self.pm, self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.source_draws = [int(n) for n in state["source_draws"]]

    def save_checkpoint(self) -> Path:
        return dcp_store.save(self.ckpt_dir, self.step, self.pm, self.optimizer, self.train_state_dict(),
                              keep=self.cfg.keep_checkpoints)

    # ---- the loop ------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Validation loss per source and overall. Every rank runs every batch (so the collectives of
        TP/EP/FSDP match); a pipeline evaluates through its schedule."""
        fields, total, count = {}, 0.0, 0
        for name in self.data.names:
            batches = self.data.val_batches(self.cfg.micro_batch, source=name, max_sequences=self.cfg.eval_sequences)
            if self.pm.module is None:
                nll, n = pipeline_evaluate(self.pm, torch.cat(list(batches)).to(self.device), self.cfg.micro_batch,
                                           self.schedules, self.cfg.bf16)
            else:
                nll, n = evaluate(self.pm.module, (b.to(self.device) for b in batches), self.cfg.bf16)
            fields[f"val_loss_{name}"] = nll / n
            total, count = total + nll, count + n
        return {"val_loss": total / count, **fields}

    def run(self, stop_at: int | None = None, on_step: Callable[[dict], None] | None = None) -> RunResult:
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        log = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is None:
                self.tokenizer.save(self.out)
            log = RunLog(self.out, resume_step=self.step if self.resumed_from is not None else None)
        result = RunResult(step=self.step, finished=False, unigram_baseline=self.data.unigram_entropy())
        try:
            if self.step == 0:
                val = self.validate()
                result.val_losses.append((0, val["val_loss"]))
                result.last_val = val
                if log is not None:
                    log.write({"step": 0, **val, "unigram_baseline": result.unigram_baseline})
            while self.step < end:
                row = self._one_step()
                result.losses.append(row["loss"])
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    val = self.validate()
                    result.last_val = val
                    row.update(val)
                    result.val_losses.append((self.step, val["val_loss"]))
                if log is not None and (self.step % cfg.log_every == 0 or "val_loss" in row):
                    log.write(row)
                if on_step is not None:
                    on_step(row)
                if "val_loss" in row or self.step % cfg.log_every == 0:
                    self._print(row)
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.save_checkpoint()
        finally:
            if log is not None:
                log.close()
        result.step = self.step
        weights = dcp_store.full_state_dict(self.pm) if self.step == cfg.steps else None
        if self.step == cfg.steps:
            if self.rank == 0:
                from moegpt.checkpoint.model_dir import save as save_model_dir

                model = build_model(self.model_cfg, device="meta")
                model.load_state_dict(weights, assign=True)
                save_model_dir(model, self.tokenizer, self.out)
            result.finished = True
        return result

    def _print(self, row: dict) -> None:
        if self.rank != 0:
            return
        val = f" val {row['val_loss']:.3f}" if "val_loss" in row else ""
        print(f"step {row['step']:5d} loss {row['loss']:.4f}{val} lr {row['lr']:.2e} batch {row['batch_size']} "
              f"{row['tokens_per_s']:.0f} tok/s mfu {row['mfu']:.2%} [{row['layout']}] "
              f"expert load per EP rank {row['ep_load']} peak MiB/rank {row['peak_mem_mb']}", flush=True)

    def _one_step(self) -> dict:
        cfg, dims = self.cfg, self.dims
        batch_size = self.batch_at(self.tokens_seen)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        samples = self.sampler.next_batch(batch_size)  # (B, 2) [source, block]: the same on every rank
        for source, n in enumerate(torch.bincount(samples[:, 0], minlength=len(self.source_draws)).tolist()):
            self.source_draws[source] += n
        batch = self.data.gather(samples).to(self.device)  # (B, T+1)
        t0 = time.perf_counter()
        metrics = distributed_train_step(self.pm, self.optimizer, batch, cfg.micro_batch,
                                         LossWeights(cfg.aux_loss_coef, cfg.z_loss_coef), cfg.grad_clip,
                                         self.model_cfg.n_moe_layers, self.model_cfg.n_experts, self.schedules,
                                         bf16=cfg.bf16)
        elapsed = time.perf_counter() - t0
        tokens = batch_size * cfg.seq_len
        self.step += 1
        self.tokens_seen += tokens
        tokens_per_s = tokens / elapsed
        # Per-expert load across EP ranks: the share of the step's assignments each EP rank computed.
        per_expert = metrics.expert_counts.sum(0) if metrics.expert_counts.numel() else torch.zeros(dims.ep)
        per_rank = per_expert.view(dims.ep, -1).sum(1).double()
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, round(peak_memory_mb(self.device), 1))
        row = {
            "step": self.step, "loss": metrics.loss, "aux_loss": metrics.aux_loss, "z_loss": metrics.z_loss,
            "lr": lr, "batch_size": batch_size, "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * dist.get_world_size()),
            "load_imbalance": metrics.load_imbalance, "grad_norm": metrics.grad_norm,
            "layout": dims.describe(), "world_size": dist.get_world_size(),
            "ep_load": [round(float(x), 4) for x in per_rank / per_rank.sum().clamp(min=1)],
            "expert_counts": per_expert.tolist(), "peak_mem_mb": peaks,
        }
        if self.record_samples:
            row["samples"] = samples.tolist()
        return row
