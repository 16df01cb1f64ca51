"""The engine: requests in, tokens out, one scheduler step at a time (continuous batching).

    engine = LLMEngine(model, tokenizer)
    rid = engine.add_request(prompt_ids, Request(max_tokens=64, sampling=SamplingParams(0.8), seed=1))
    while engine.has_work:
        for update in engine.step(): ...          # new tokens of each request, and whether it finished

Each request owns its random generator (seeded per request), so its samples do not depend on what
else shares the batch, and a preempted request resumes its stream where it stopped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from moegpt.infer.block_manager import BlockManager
from moegpt.infer.paged_cache import PagedKVCache, kv_bytes_per_token
from moegpt.infer.runner import ModelRunner
from moegpt.infer.sampling import SamplingParams, sample
from moegpt.infer.scheduler import Scheduler, SchedulerConfig
from moegpt.infer.sequence import FinishReason, Sequence
from moegpt.model import MoEGPT


@dataclass(frozen=True)
class Request:
    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 256 * 2**20  # KV memory budget
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.kv_cache_bytes < 1:
            raise ValueError(f"block_size ({self.block_size}) and kv_cache_bytes ({self.kv_cache_bytes}) must be >= 1")


@dataclass(frozen=True)
class StepUpdate:
    request_id: int
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None  # None while the request runs


class LLMEngine:
    def __init__(self, model: MoEGPT, config: EngineConfig = EngineConfig()):
        self.model, self.config = model.eval(), config
        param = next(model.parameters())
        per_block = kv_bytes_per_token(model.cfg, param.dtype) * config.block_size
        num_blocks = config.kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {per_block} bytes")
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.cache = PagedKVCache(model.cfg, num_blocks, config.block_size, param.dtype, param.device)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.runner = ModelRunner(model, self.cache)
        self.requests: dict[int, tuple[Sequence, Request, torch.Generator]] = {}
        self._ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, prompt_ids: list[int], request: Request = Request()) -> int:
        if len(prompt_ids) + request.max_tokens > self.model.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({request.max_tokens}) exceeds the "
                             f"context ({self.model.cfg.max_seq_len})")
        rid = next(self._ids)
        seq = Sequence(rid, list(prompt_ids), request.max_tokens)
        self.scheduler.add(seq)  # raises before anything is stored if it can never fit
        gen = torch.Generator().manual_seed(request.seed if request.seed is not None else rid)
        self.requests[rid] = (seq, request, gen)
        return rid

    def abort(self, request_id: int) -> None:
        if self.scheduler.abort(request_id) is not None:
            self.requests.pop(request_id, None)

    def step(self) -> list[StepUpdate]:
        batch = self.scheduler.schedule()
        if not batch.entries:
            return []
        seq_ids, logits = self.runner.run(batch)
        sampled = {}
        for rid, row in zip(seq_ids, logits):
            _, request, gen = self.requests[rid]
            sampled[rid] = int(sample(row[None], request.sampling, gen)[0])
        stops = {rid: self.requests[rid][1].stop_token_ids for rid in seq_ids}
        self.scheduler.update(batch, sampled, stops)
        updates = []
        for rid in seq_ids:
            seq = self.requests[rid][0]
            updates.append(StepUpdate(rid, (sampled[rid],), seq.finish_reason))
            if seq.is_finished:
                del self.requests[rid]
        return updates

    def generate(self, prompts: list[list[int]], request: Request = Request()) -> list[list[int]]:
        """Run ``prompts`` to completion together; returns each one's generated token ids."""
        ids = [self.add_request(p, request) for p in prompts]
        out: dict[int, list[int]] = {rid: [] for rid in ids}
        while self.has_work:
            for update in self.step():
                out[update.request_id].extend(update.new_token_ids)
        return [out[rid] for rid in ids]
