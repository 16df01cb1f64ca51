"""Serving a model sharded over torch.distributed ranks, behind the same engine.

Rank 0 runs the engine: the scheduler, the block manager, sampling and (``moegpt serve``) the HTTP
server. Each step it broadcasts the step's chunks (a small pickled plan: tokens, positions, block
tables), and every rank runs its shard of the step; there is no second scheduler, and the block
tables every rank writes its KV cache by are rank 0's. The other ranks ``follow``: they wait for
plans and run them until rank 0 says stop.

Within a step (parallel/serving.py has what each rank holds):
- tensor / expert parallel ranks of a stage all run the step's tokens, their collectives inside the
  layers;
- with pipeline stages, the step's chunks are cut into micro-batches (as many as stages, by
  tokens); stage s runs micro-batch j while stage s+1 runs j-1, hidden states go stage to stage
  with send/recv, and the last stage sends each micro-batch's logits (and the per-expert counts of
  every stage's MoE layers) to rank 0. ``PipelineTimes`` keeps how long each rank computed and how
  long its steps took: the rest is the pipeline's bubble.

Every collective has the process group's timeout, and rank 0 sends a heartbeat while idle, so a
rank that dies is noticed at the next step or heartbeat (the server then answers 503 and exits
non-zero), and followers of a rank 0 that died stop waiting.

Legend: N tokens of a micro-batch, L logit rows it asks for, D d_model, V vocab, E experts, Lm MoE
layers of the whole model.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moegpt.config import ModelConfig
from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.decode_batch import DecodeBatchState
from moegpt.infer.engine import EngineConfig, kv_bytes_per_block
from moegpt.infer.layout import lay_out_for_decoding
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.infer.runner import Chunk, ModelRunner, StepOutput
from moegpt.model import MoEGPT
from moegpt.parallel.dims import ParallelDims
from moegpt.parallel.serving import (ServeRank, ShardCollectives, check_quantized_split, serve_groups, serve_rank,
                                     shard_model, shard_slices)

RUN, PING, STOP = "run", "ping", "stop"
PLAN_BYTES = 8192  # one broadcast carries a plan up to this size (a decode step of ~60 sequences)


class ShardFailure(RuntimeError):
    """A collective failed: a rank died, or timed out. The sharded model cannot go on."""


def exchange_plan(plan, device: torch.device = torch.device("cpu")):
    """Rank 0's plan (any picklable; None on the other ranks) to every rank: one broadcast of
    PLAN_BYTES carrying its length and its start, a second one for the rest of a longer plan (half
    the cost of broadcast_object_list's two for every plan). -> the plan, on every rank."""
    head = torch.zeros(PLAN_BYTES, dtype=torch.uint8, device=device)
    if plan is not None:  # rank 0
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        body = torch.frombuffer(bytearray(len(data).to_bytes(8, "little") + data), dtype=torch.uint8)
        head[:min(PLAN_BYTES, body.numel())] = body[:PLAN_BYTES]
    dist.broadcast(head, src=0)
    size = int.from_bytes(bytes(head[:8].tolist()), "little")
    if plan is not None:
        rest = body[PLAN_BYTES:].to(device)
    else:
        rest = torch.empty(max(0, size + 8 - PLAN_BYTES), dtype=torch.uint8, device=device)
    if rest.numel():
        dist.broadcast(rest, src=0)
    if plan is not None:
        return plan
    return pickle.loads((head[8:].cpu().numpy().tobytes() + rest.cpu().numpy().tobytes())[:size])


def micro_batches(chunks: list[Chunk], n: int) -> list[list[Chunk]]:
    """The step's chunks in at most ``n`` contiguous groups of about equal tokens, none empty."""
    n = max(1, min(n, len(chunks)))
    total = sum(len(c.tokens) for c in chunks)
    groups: list[list[Chunk]] = [[] for _ in range(n)]
    seen = 0
    for i, c in enumerate(chunks):
        g = max(min(seen * n // total, n - 1), n - (len(chunks) - i))  # the chunks left fill the groups left
        groups[g].append(c)
        seen += len(c.tokens)
    return [g for g in groups if g]


@dataclass
class PipelineTimes:
    """One rank's seconds: computing its stage (``busy``) and in whole steps (``wall``)."""

    busy: float = 0.0
    wall: float = 0.0
    steps: int = 0

    @property
    def bubble(self) -> float:
        """The share of its step time the rank waited (0 without pipeline stages)."""
        return 1.0 - self.busy / self.wall if self.wall > 0 else 0.0


class ShardedRunner:
    """The runner of a sharded model: on rank 0 the engine's (``run``: one step over all ranks), on
    every other rank the loop that follows rank 0's plans (``follow``)."""

    def __init__(self, runner: ModelRunner, rank: ServeRank, cfg: ModelConfig, pipe_group=None):
        self.runner, self.rank, self.cfg = runner, rank, cfg  # cfg: the whole model's
        self.pipe_group = pipe_group
        self.times = PipelineTimes()
        self.states = [runner.decode_batch] + [DecodeBatchState(runner.cache.block_size, runner.cache.k[0].device)
                                               for _ in range(rank.dims.pp - 1)]  # one per micro-batch
        moe = [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
        self.moe_before = sum(moe[:rank.first_layer])  # MoE layers of the stages before this one
        self.moe_through = sum(moe[:rank.last_layer])  # ... and of this one
        self.moe_total = sum(moe)
        self.dtype = runner.model.norm.weight.dtype
        self.device = runner.model.norm.weight.device
        self.plan_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.closed = False
        self.broken = False  # a collective failed: nothing more can run on this world

    # ---- rank 0 --------------------------------------------------------------------------------
    def run(self, chunks: list[Chunk]) -> StepOutput:
        self._broadcast((RUN, chunks))
        return self._guarded(self.step, chunks)

    def ping(self) -> None:
        """A heartbeat: followers are alive (else ShardFailure) and stop waiting for a plan."""
        self._broadcast((PING, None))

    def stop(self) -> list[PipelineTimes]:
        """Tell every rank to stop; every rank's times, by rank."""
        if self.closed or self.broken:
            return []
        self._broadcast((STOP, None))
        self.closed = True
        return self._gather_times()

    # ---- the other ranks -----------------------------------------------------------------------
    def follow(self) -> None:
        """Run rank 0's plans until it says stop (ShardFailure when rank 0 is gone)."""
        while True:
            kind, chunks = self._guarded(exchange_plan, None, self.plan_device)
            if kind == STOP:
                self._gather_times()
                return
            if kind == RUN:
                self._guarded(self.step, chunks)

    # ---- every rank ----------------------------------------------------------------------------
    def _broadcast(self, plan) -> None:
        self._guarded(exchange_plan, plan, self.plan_device)

    def _guarded(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardFailure:
            raise
        except RuntimeError as e:  # (gloo's and NCCL's errors, DistBackendError included)
            self.broken = True
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ShardFailure(f"rank {self.rank.rank}: the sharded step failed ({text})") from e

    def _gather_times(self) -> list[PipelineTimes]:
        out = [None] * dist.get_world_size() if self.rank.rank == 0 else None
        dist.gather_object(self.times, out, dst=0)
        return out or []

    def step(self, chunks: list[Chunk]) -> StepOutput | None:
        """This rank's share of one step; rank 0 gets the logits of the whole step."""
        start = time.perf_counter()
        if self.rank.dims.pp == 1:
            out = self.runner.run(chunks)
            self.times.busy += time.perf_counter() - start
        else:
            out = self._pipeline(chunks)
        self.times.wall += time.perf_counter() - start
        self.times.steps += 1
        return out

    def _pipeline(self, chunks: list[Chunk]) -> StepOutput | None:
        r, cfg = self.rank, self.cfg
        E, D = cfg.n_experts, cfg.d_model
        groups = micro_batches(chunks, r.dims.pp)
        g = self.pipe_group
        prev, nxt, last = r.rank_at(r.pp - 1), r.rank_at(r.pp + 1), r.rank_at(r.dims.pp - 1, 0, 0)
        pending = []  # sends in flight (their tensors must live until they complete)
        for j, group in enumerate(groups):
            n = sum(len(c.tokens) for c in group)
            hidden, counts = None, torch.zeros(0, E, dtype=torch.long, device=self.device)
            if not r.is_first_stage:  # the previous stages' expert counts and hidden states, one message
                counts, hidden = self._recv(prev, j, (self.moe_before, E), (n, D))
            t0 = time.perf_counter()
            self.runner.decode_batch = self.states[j]  # each micro-batch keeps its own decode metadata
            out = self.runner.run(group, hidden)
            if out.expert_counts is not None:
                counts = torch.cat([counts, out.expert_counts.to(self.device)])
            self.times.busy += time.perf_counter() - t0
            msg, dst = None, None
            if not r.is_last_stage:
                msg, dst = pack(counts, out.hidden), nxt
            elif r.ep == 0 and r.tp == 0:  # one rank of the last stage reports to rank 0
                msg, dst = pack(counts, out.logits), 0
            if msg is not None and msg.numel():  # (nothing to say: no MoE layer and no logit row asked for)
                pending.append(dist.isend(msg, dst, group=g, tag=j))
        result = None
        if r.rank == 0:
            logits, counts = [], []
            for j, group in enumerate(groups):
                c, rows = self._recv(last, j, (self.moe_total, E), (sum(c.num_logits for c in group), cfg.vocab_size))
                logits.append(rows)
                counts.append(c)
            result = StepOutput(logits=torch.cat(logits), expert_counts=torch.stack(counts).sum(0) if self.moe_total else None)
        for work in pending:
            work.wait()
        return result

    def _recv(self, src: int, j: int, counts_shape: tuple[int, int],
              values_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch j's message from ``src``: expert counts (int64) and values (the model's dtype)."""
        counts_bytes = math.prod(counts_shape) * 8
        msg = torch.empty(counts_bytes + math.prod(values_shape) * self.dtype.itemsize, dtype=torch.uint8,
                          device=self.device)
        if msg.numel():
            dist.recv(msg, src, group=self.pipe_group, tag=j)
        return (msg[:counts_bytes].view(torch.long).view(counts_shape),
                msg[counts_bytes:].view(self.dtype).view(values_shape))


def pack(counts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One message of a pipeline stage: expert counts (int64, first: 8-byte aligned) then values."""
    return torch.cat([counts.contiguous().view(-1).view(torch.uint8), values.contiguous().view(-1).view(torch.uint8)])


@dataclass(kw_only=True)
class ShardedWorld:
    """This process's place in a sharded serving run: its rank, its shard of the model, its groups."""

    rank: ServeRank
    collectives: ShardCollectives
    cfg: ModelConfig  # the whole model's
    model: MoEGPT  # this rank's shard (model.cfg: local_config)
    tokenizer: Tokenizer | None
    runner_: ShardedRunner | None = None

    @property
    def is_driver(self) -> bool:
        """Rank 0: the engine, the scheduler, sampling, the server."""
        return self.rank.rank == 0

    def agree_num_blocks(self, n: int) -> int:
        """The KV blocks every rank can hold: the fewest any rank can (each rank's budget is its own)."""
        t = torch.tensor([n], device=self.model.norm.weight.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def runner(self, model: MoEGPT, cache: PagedKVCache, images=None) -> ShardedRunner:
        if images is not None:
            raise ValueError("a vision model serves on one process")
        inner = ModelRunner(model, cache, comm=self.collectives if self.rank.dims.tp * self.rank.dims.ep > 1 else None,
                            first=self.rank.is_first_stage, last=self.rank.is_last_stage)
        self.runner_ = ShardedRunner(inner, self.rank, self.cfg, self.collectives.pipe_group)
        return self.runner_

    def follow(self, config: EngineConfig) -> None:
        """A rank other than 0: a KV cache for its shard, then rank 0's steps until it says stop."""
        model = lay_out_for_decoding(self.model.eval())
        per_block = kv_bytes_per_block(model, config.block_size, config.kv_cache_dtype)
        num_blocks = self.agree_num_blocks(config.num_kv_blocks or config.kv_cache_bytes // per_block)
        param = model.norm.weight
        cache = PagedKVCache(model.cfg, num_blocks, config.block_size, param.dtype, param.device,
                             config.kv_cache_dtype)
        self.runner(model, cache).follow()

    def stop(self) -> list[PipelineTimes]:
        """Rank 0: release the other ranks; every rank's pipeline times."""
        return self.runner_.stop() if self.runner_ is not None else []

    def close(self) -> None:
        """Every rank, after ``stop`` / ``follow``: leave the process group together."""
        from moegpt.parallel.process_group import close_distributed

        close_distributed()


def start_from_args(args) -> ShardedWorld | None:
    """``--tp/--pp/--ep`` (under torchrun): join the group and load this rank's shard (None: one process)."""
    from moegpt.parallel.serving import serve_layout

    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout={args.dist_timeout} must be > 0")
    dims = serve_layout(args.tp, args.pp, args.ep, args.first_stage_layers)
    if dims.world_size == 1 and world_size_from_env() == 1:
        return None
    return start(args.model, dims, args.dist_timeout)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(model_dir: str | Path, dims: ParallelDims, timeout_s: float = 120.0,
          shared_memory: bool = True) -> ShardedWorld:
    """Join the torchrun group and load this rank's shard of ``model_dir``. The layout is checked
    against the world and the model first: a bad one fails at once on every rank, naming every value.
    ``shared_memory``: TP and EP ranks on one CPU machine exchange through shared memory (False:
    gloo's collectives, as between machines)."""
    from moegpt.checkpoint.model_dir import config_from_hf, read_hf_config
    from moegpt.checkpoint.partial import load_part
    from moegpt.checkpoint.vision_dir import has_vision
    from moegpt.parallel.process_group import init_distributed

    world = world_size_from_env()
    hf = read_hf_config(Path(model_dir))
    cfg = config_from_hf(hf, where=str(Path(model_dir) / "config.json"))
    if dims.world_size != world and world == 1:
        raise ValueError(f"--tp {dims.tp} --pp {dims.pp} --ep {dims.ep} needs {dims.world_size} processes: "
                         f"run under torchrun --nproc-per-node {dims.world_size}")
    dims.validate(world, cfg)
    if has_vision(Path(model_dir)):
        raise ValueError(f"{model_dir} is a vision model: vision models serve on one process")
    if "quantization_config" in hf:
        from moegpt.checkpoint.quantized import scheme_from_config

        check_quantized_split(cfg, scheme_from_config(hf["quantization_config"], str(model_dir)), dims.tp)
    device = init_distributed(timeout_s)
    rank = serve_rank(dims, dist.get_rank(), cfg.n_layers)
    loaded = load_part(model_dir, lambda name: shard_slices(name, cfg, rank), device)  # this rank's parts only
    collectives = serve_groups(dims, device.type, timeout_s, shared_memory)
    model = shard_model(loaded.model, rank, collectives)
    return ShardedWorld(rank=rank, collectives=collectives, cfg=cfg, model=model, tokenizer=loaded.tokenizer)
