"""The training loop, one for every layout: data, model, optimizer, logs, validation, checkpoints.

One process and every torchrun layout run this same loop; what differs (how the model is built and
stepped, how checkpoints are written) is the runtime's (runtime.py). The recipe is the same at any
scale: every rank draws the same global batch from the same sampler (the batch-size ramp and the
per-source epoch mixture are functions of the global step and tokens seen), and the step hands out
whole micro-batches, so the global sample order does not depend on the layout. A checkpoint holds
the sampler position, so a run resumed in another layout, or restarted by torchrun after a failure,
continues with the next sample.

A run directory holds everything::

    OUT/checkpoints/   resumable training state (checkpoint/store.py; DCP under torchrun: parallel/checkpoint.py)
    OUT/log.jsonl      one JSON row per logged step (and per validation)
    OUT/log.csv        the same step rows as CSV
    OUT/config.json, model.safetensors, tokenizer.json ...   the final model directory

A resumed run sees exactly the samples, learning rates and random numbers that an unbroken run
would: the step, the sampler position, the optimizer and the RNG states are all in the checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from moegpt.checkpoint.hf import mixtral_incompatibility
from moegpt.checkpoint.model_dir import save as save_model_dir
from moegpt.config import ModelConfig, field_differences
from moegpt.counts import train_flops_per_token
from moegpt.data.corpus_tokenizer import corpus_tokenizer
from moegpt.data.dataset import MixtureData, build_mixture
from moegpt.data.sft import SFTData, build_sft_data
from moegpt.data.sources import Source
from moegpt.data.tokenizer import Tokenizer
from moegpt.data.vision_data import VisionData
from moegpt.hardware import measure_matmul_flops
from moegpt.train.config import TrainConfig
from moegpt.train.log import RunLog
from moegpt.train.runtime import DistributedRuntime, LocalRuntime
from moegpt.train.schedule import BatchRamp, LRSchedule
from moegpt.train.vision import VisionTraining

if TYPE_CHECKING:
    from moegpt.parallel import ParallelDims
    from moegpt.train.finetune import Finetune

@dataclass
class RunResult:
    step: int  # steps completed
    finished: bool  # reached cfg.steps (and saved the model directory)
    unigram_baseline: float  # val loss of a model that knows only token frequencies (nats/token)
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    last_val: dict[str, float] = field(default_factory=dict)  # newest validation, overall and per source


def check_resume_compatible(ckpt: dict, model_cfg: ModelConfig, train_cfg: TrainConfig, mixture: list,
                            where: Path, finetune: dict | None = None) -> None:
    missing = {"model_config", "train_config", "mixture", "tokenizer_fingerprint", "step"} - set(ckpt)
    if missing:
        raise ValueError(f"checkpoint {where} is not a moegpt training checkpoint (missing {sorted(missing)})")
    if [list(m) for m in ckpt["mixture"]] != mixture:
        raise ValueError(f"cannot resume {where}: data mixture differs ({ckpt['mixture']} -> {mixture})")
    diffs = field_differences(ckpt["model_config"], model_cfg.to_dict())
    if diffs:
        raise ValueError(f"cannot resume {where}: model config differs ({'; '.join(diffs)})")
    diffs = TrainConfig(**ckpt["train_config"]).differences(train_cfg)
    if diffs:
        raise ValueError(f"cannot resume {where}: train config differs ({'; '.join(diffs)})")
    before, now = ckpt.get("finetune") or {}, finetune or {}
    if before != now:
        diffs = field_differences(before, now) + [f"{k}: None -> {now[k]!r}" for k in now if k not in before]
        raise ValueError(f"cannot resume {where}: fine-tuning settings differ ({'; '.join(diffs)})")


def check_fresh_out(out: Path) -> None:
    """A run that starts afresh writes into an empty or new ``out``, never over another run's."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; pass --resume to continue a run, or choose another --out")


class Trainer:
    """Builds everything a run needs, checking inputs and any checkpoint before the costly work.

    ``dims`` None: one process. Otherwise every rank of a torchrun group builds a Trainer with the
    same arguments (the group already joined: parallel/process_group.py); rank 0 writes the log, the
    tokenizer and the final model directory.

    ``finetune`` (train/finetune.py): start from a model directory's weights and tokenizer and read
    conversations (``sources`` are then data.sft.ConversationSets) instead of pre-training text; or
    (train/vision.py) join that model to an image side and read generated image conversations
    (``sources`` are then data.vision_data.ImageTextSources)."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path,
                 sources: Sequence[Source], cache_dir: str | Path, *, resume: bool = False,
                 dims: ParallelDims | None = None, device: torch.device = torch.device("cpu"),
                 record_samples: bool = False, finetune: Finetune | VisionTraining | None = None):
        self.model_cfg, self.cfg, self.out = model_cfg, train_cfg, Path(out)
        self.record_samples = record_samples
        self.finetune = finetune
        settings = finetune.settings if finetune is not None else None
        if dims is None:
            rt = self.runtime = LocalRuntime()
        else:
            import torch.distributed as dist

            dims.validate(dist.get_world_size(), model_cfg)
            rt = self.runtime = DistributedRuntime(dims, device)
        if train_cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len ({train_cfg.seq_len}) exceeds the model's max_seq_len ({model_cfg.max_seq_len})")
        reason = mixtral_incompatibility(model_cfg)
        if reason is not None:  # the final model directory is in HF Mixtral format
            raise ValueError(f"cannot train to a model directory: {reason}")
        self.mixture = [[s.name, s.epochs] for s in sources]
        self.ckpt_dir = self.out / "checkpoints"
        self.resumed_from: Path | None = None
        train_state = None
        if resume:
            existing = rt.latest_checkpoint(self.ckpt_dir)
            if existing is None:
                raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}")
            train_state = rt.read_train_state(existing)
            check_resume_compatible(train_state, model_cfg, train_cfg, self.mixture, existing, settings)
            self.resumed_from = existing
        elif not rt.restarted:
            check_fresh_out(self.out)
        rt.barrier()  # every rank has checked the directory before rank 0 writes into it

        # Rank 0 trains the tokenizer and tokenizes the sources (both cached); the others then load them.
        if resume:  # the one the run started with
            self.tokenizer = rt.main_first(lambda: Tokenizer.load(self.out / "tokenizer.json"))
            if train_state["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
                raise ValueError(f"{self.out / 'tokenizer.json'} is not the tokenizer checkpoint "
                                 f"{self.resumed_from.name} was trained with")
        elif finetune is not None:
            self.tokenizer = finetune.tokenizer
        else:
            self.tokenizer = rt.main_first(lambda: corpus_tokenizer(sources, model_cfg.vocab_size, cache_dir))
        if self.tokenizer.vocab_size != model_cfg.vocab_size and not (
                finetune is not None and self.tokenizer.vocab_size < model_cfg.vocab_size):  # (a padded HF vocab)
            raise ValueError(f"tokenizer vocab ({self.tokenizer.vocab_size}) != model vocab_size ({model_cfg.vocab_size})")
        vision = finetune if isinstance(finetune, VisionTraining) else None
        if vision is not None:
            self.data: MixtureData | SFTData | VisionData = VisionData(
                tuple(sources), vision.tokenizer, vision.chat, vision.processing, train_cfg.seq_len, train_cfg.seed)
        elif finetune is not None:
            self.data = rt.main_first(lambda: build_sft_data(
                sources, self.tokenizer, finetune.chat, train_cfg.seq_len, finetune.packing, finetune.drop_long,
                cache_dir, train_cfg.val_fraction))
        else:
            self.data = rt.main_first(lambda: build_mixture(
                sources, self.tokenizer, train_cfg.seq_len, cache_dir, train_cfg.val_fraction))
        self.sampler = self.data.make_sampler(train_cfg.seed)
        self.source_draws = [0] * len(sources)  # training samples drawn from each source so far

        torch.manual_seed(train_cfg.seed)
        rt.build(model_cfg, train_cfg, None if finetune is None else finetune.weights,
                 make_model=None if vision is None else vision.make_model)
        self.lr_at = LRSchedule(peak=train_cfg.lr, warmup_steps=train_cfg.warmup_steps, total_steps=train_cfg.steps,
                                min_ratio=train_cfg.min_lr_ratio)
        start = train_cfg.batch_start or train_cfg.batch_size
        self.batch_at = BatchRamp(start=start, full=train_cfg.batch_size, ramp_tokens=train_cfg.ramp_tokens,
                                  multiple=train_cfg.micro_batch)
        self.step, self.tokens_seen = 0, 0
        self.flops_per_token = train_flops_per_token(model_cfg, train_cfg.seq_len)
        self.peak_flops = train_cfg.peak_flops or measure_matmul_flops(
            torch.bfloat16 if train_cfg.bf16 else torch.float32, rt.device.type)
        if self.resumed_from is not None:
            rt.restore(self.resumed_from)
            self.sampler.load_state_dict(train_state["sampler"])
            self.step, self.tokens_seen = int(train_state["step"]), int(train_state["tokens_seen"])
            self.source_draws = [int(n) for n in train_state["source_draws"]]

    @property
    def model(self) -> MoEGPT:
        """The plain model of a one-process run (a layout's is split: ``runtime.pm``)."""
        return self.runtime.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.runtime.optimizer

    def epochs_seen(self) -> dict[str, float]:
        """Passes over each source's training blocks so far (the mixture's epochs are targets for
        a whole pass; a short run sees a fraction of them, in the same proportions)."""
        return {name: draws / blocks for name, draws, blocks in
                zip(self.data.names, self.source_draws, self.data.train_block_counts)}

    # ---- checkpoint state ----------------------------------------------------------------------
    def train_state(self) -> dict:
        """Everything but the weights and optimizer state, which the runtime saves its own way."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "mixture": self.mixture,
            "source_draws": list(self.source_draws),
            "finetune": self.finetune.settings if self.finetune is not None else None,
        }

    def save_checkpoint(self) -> Path:
        return self.runtime.save_checkpoint(self.ckpt_dir, self.step, self.train_state(), self.cfg.keep_checkpoints)

    # ---- the loop ------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Validation loss per source and over all of them (token-weighted), as log fields."""
        fields, total, count = {}, 0.0, 0
        for name in self.data.names:
            batches = self.data.val_batches(self.cfg.micro_batch, source=name, max_sequences=self.cfg.eval_sequences)
            nll, n = self.runtime.evaluate(batches)
            fields[f"val_loss_{name}"] = nll / n
            total, count = total + nll, count + n
        return {"val_loss": total / count, **fields}

    def run(self, stop_at: int | None = None, stop_requested: threading.Event | None = None,
            progress: bool = True, on_step: Callable[[dict], None] | None = None) -> RunResult:
        """Train until cfg.steps (or ``stop_at``, or ``stop_requested`` on any rank); checkpoint on the
        way out. ``on_step`` sees every step's row on every rank; rank 0 logs and shows the bar."""
        cfg, rt = self.cfg, self.runtime
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        log = bar = None
        if rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is None:
                self.tokenizer.save(self.out)  # the run's tokenizer, for resume and the final model
                if self.finetune is not None:
                    self.finetune.record(self.out)
            log = RunLog(self.out, resume_step=self.step if self.resumed_from is not None else None)
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
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
                    result.last_val = self.validate()
                    row.update(result.last_val)
                    result.val_losses.append((self.step, row["val_loss"]))
                if log is not None and (self.step % cfg.log_every == 0 or "val_loss" in row):
                    log.write(row)
                if on_step is not None:
                    on_step(row)
                if bar is not None:
                    bar.update(1)
                    postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}", "mfu": f"{row['mfu']:.1%}"}
                    if result.val_losses:
                        postfix["val"] = f"{result.val_losses[-1][1]:.3f}"
                    bar.set_postfix(postfix)
                stopping = rt.any_rank(stop_requested is not None and stop_requested.is_set())
                if self.step % cfg.ckpt_every == 0 or self.step == end or stopping:
                    self.save_checkpoint()
                if stopping:
                    break
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        result.step = self.step
        if self.step == cfg.steps:
            model = rt.final_model()  # gathered on rank 0 in a layout
            if model is not None:
                save_model_dir(model, self.tokenizer, self.out)
            result.finished = True
        return result

    def _one_step(self) -> dict:
        cfg = self.cfg
        batch_size = self.batch_at(self.tokens_seen)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        samples = self.sampler.next_batch(batch_size)  # (B, 2) [source, block]: the same on every rank
        for source, n in enumerate(torch.bincount(samples[:, 0], minlength=len(self.source_draws)).tolist()):
            self.source_draws[source] += n
        batch = self.data.gather(samples)  # (B, T+1)
        t0 = time.perf_counter()
        metrics = self.runtime.step(batch)
        elapsed = time.perf_counter() - t0
        tokens = batch_size * cfg.seq_len
        self.step += 1
        self.tokens_seen += tokens
        tokens_per_s = tokens / elapsed
        row = {
            "step": self.step, "loss": metrics.loss, "aux_loss": metrics.aux_loss, "z_loss": metrics.z_loss,
            "lr": lr, "batch_size": batch_size, "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.runtime.world_size),
            "load_imbalance": metrics.load_imbalance, "grad_norm": metrics.grad_norm,
            **self.runtime.row_fields(metrics),
        }
        if self.record_samples:
            row["samples"] = samples.tolist()
        return row


def default_cache_dir() -> Path:
    """``$MOEGPT_CACHE``, else ``~/.cache/moegpt``."""
    return Path(os.environ.get("MOEGPT_CACHE", Path.home() / ".cache" / "moegpt"))
