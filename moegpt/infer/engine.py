"""The engine: requests in, tokens out, one scheduler step at a time (continuous batching).

    engine = LLMEngine(model, tokenizer=tok)   # re-lays out ``model``'s weights in place (see LLMEngine)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    while engine.has_work:
        for update in engine.step(): ...   # new tokens and text of each request, and whether it finished

    for update in engine.stream(prompt_ids, SamplingParams(max_tokens=64)): ...   # one request's updates
    outputs = engine.generate([prompt_ids, ...], SamplingParams(temperature=0))   # RequestOutputs

A step: the scheduler picks each running sequence's next chunk; a proposer (if speculative decoding
is on) guesses draft tokens; the runner runs the target model once over all chunks; each sequence
samples (or verifies its drafts) with its own random generator; the scheduler appends the tokens and
frees finished sequences; the detokenizer turns tokens into text and watches for stop strings.

Each sequence owns its generator (seeded per request and choice), and nothing mixes numbers across
sequences, so a request's output does not depend on what else shares the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass, field

import torch

from moegpt.data.tokenizer import Tokenizer
from moegpt.counts import KV_SCALE_BYTES, kv_cache_bytes_per_token
from moegpt.infer.block_manager import BlockManager
from moegpt.infer.detokenizer import Detokenizer
from moegpt.infer.draft import DraftModelProposer
from moegpt.infer.image_cache import image_digest
from moegpt.infer.images import RequestImages
from moegpt.infer.kv_quant import kv_storage
from moegpt.infer.layout import lay_out_for_decoding
from moegpt.infer.outputs import OutputCollector, RequestOutput, StepUpdate, TokenLogprob
from moegpt.infer.paged_cache import PagedKVCache
from moegpt.infer.runner import Chunk, ModelRunner
from moegpt.infer.sampling import apply_penalties, filtered_probs, greedy, sample, top_logprobs
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.scheduler import Batch, Scheduler, SchedulerConfig
from moegpt.infer.sequence import FinishReason, Sequence
from moegpt.infer.speculative import Proposal, SpeculativeConfig, SpeculativeMethod, verify, verify_greedy
from moegpt.model import MoEGPT, compute_weight
from moegpt.model.vision.vision_model import VisionMoEGPT


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 256 * 2**20  # KV memory budget (target and draft caches together)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_caching: bool = True
    speculative: SpeculativeConfig | None = None
    num_kv_blocks: int | None = None  # the budget in blocks instead (overrides kv_cache_bytes)
    image_cache_blocks: int = 64  # a vision model's images whose cross-attention keys and values are kept
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "int8" / "fp8": 8 bits and a scale per slot and head

    def __post_init__(self):
        if self.kv_cache_dtype != "auto":
            kv_storage(self.kv_cache_dtype)  # a one-line error naming the value
        if self.block_size < 1 or self.kv_cache_bytes < 1:
            raise ValueError(f"block_size ({self.block_size}) and kv_cache_bytes ({self.kv_cache_bytes}) must be >= 1")
        if self.image_cache_blocks < 1:
            raise ValueError(f"image_cache_blocks={self.image_cache_blocks} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1")


@dataclass(kw_only=True)
class EngineStats:
    """Counters for monitoring; totals count since the engine started."""

    running: int = 0
    waiting: int = 0
    waiting_tokens: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    steps: int = 0
    preemptions: int = 0
    aborted: int = 0
    prompt_tokens: int = 0  # prompt tokens run through the model (recomputation included)
    generation_tokens: int = 0
    spec_proposed: int = 0  # draft tokens verified
    spec_accepted: int = 0  # ... and accepted
    images_encoded: int = 0  # images run through the vision encoder and resampler
    image_cache_hits: int = 0  # images whose cross-attention keys and values were cached already
    image_blocks_total: int = 0
    image_blocks_used: int = 0  # image cache blocks read by requests, or keeping a finished one's image
    expert_tokens: torch.Tensor | None = None  # (Lm, E) tokens routed to each expert, all steps
    last_expert_counts: torch.Tensor | None = None  # (Lm, E) of the last step: per-expert batch sizes

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None


@dataclass(kw_only=True)
class _Live:
    """A running completion: its sequence, where it came from, its options, RNG and detokenizer."""

    seq: Sequence
    request_id: int
    index: int
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    detok: Detokenizer | None
    image_blocks: tuple[int, ...] = ()  # the image cache blocks it reads, one per image in its prompt


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    """A request's random generator, on the model's device (its draws are made there)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed + index * 1_000_003) % 2**63)
    return g


def kv_bytes_per_block(model: MoEGPT, block_size: int, kv_dtype: str) -> int:
    if kv_dtype == "auto":
        return kv_cache_bytes_per_token(model.cfg, compute_weight(model).dtype.itemsize) * block_size
    return kv_cache_bytes_per_token(model.cfg, kv_storage(kv_dtype).itemsize, KV_SCALE_BYTES) * block_size


class LLMEngine:
    """Continuous-batching decoding of one model (and optionally a draft).

    model: the model to decode with. **Changed in place**: the engine re-lays out its fp32 CPU
        matmul weights for decoding (same names, shapes and values, stored (in, out); see
        ``moegpt.infer.layout``) and puts it in eval mode. ``restore_layout(model)`` undoes the layout.
    config: KV cache, scheduler, prefix caching and speculative decoding.
    tokenizer: needed for text (stop strings, detokenized updates) and to stop at its eos token.
    draft: a draft model for speculative decoding; changed in place like ``model``.
    shards: on rank 0 of a sharded model (infer/sharded.py: ``ShardedWorld``), ``model`` is this
        rank's shard; every step runs on all ranks (the draft on rank 0 alone).

    A vision model (model/vision) takes requests with images: each image is encoded (tower and
    resampler) once when its request is added, its cross-attention keys and values kept in the
    image cache (image_cache.py) by content hash and shared by every request showing it; a request
    holds its images' blocks until it finishes or is aborted (a preempted request keeps them, so
    recomputing its prompt encodes nothing again).
    """

    def __init__(self, model: MoEGPT | VisionMoEGPT, config: EngineConfig = EngineConfig(),
                 tokenizer: Tokenizer | None = None, draft: MoEGPT | None = None, *, shards=None):
        self.model, self.config, self.tokenizer = lay_out_for_decoding(model.eval()), config, tokenizer
        spec = config.speculative
        if draft is not None and spec is None:
            spec = SpeculativeConfig()
        if spec is not None and spec.method == SpeculativeMethod.DRAFT and draft is None:
            raise ValueError("speculative method 'draft' needs a draft model")
        if draft is not None and draft.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"draft vocab_size ({draft.cfg.vocab_size}) differs from the model's ({model.cfg.vocab_size})")
        self.spec = spec
        self.draft = lay_out_for_decoding(draft.eval()) if draft is not None and spec.method == SpeculativeMethod.DRAFT else None
        per_block = kv_bytes_per_block(model, config.block_size, config.kv_cache_dtype)
        if self.draft is not None:
            per_block += kv_bytes_per_block(self.draft, config.block_size, config.kv_cache_dtype)
        num_blocks = config.num_kv_blocks or config.kv_cache_bytes // per_block
        if shards is not None:  # the model is sharded over ranks (infer/sharded.py): every rank's cache alike
            num_blocks = shards.agree_num_blocks(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {per_block} bytes")
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching, self.draft is not None)
        param = compute_weight(model)
        self.cache = PagedKVCache(model.cfg, num_blocks, config.block_size, param.dtype, param.device,
                                  config.kv_cache_dtype)
        sched = config.scheduler
        if spec is not None:
            sched = SchedulerConfig(max_num_seqs=sched.max_num_seqs, max_batched_tokens=sched.max_batched_tokens,
                                    num_lookahead=spec.num_tokens)
        self.scheduler = Scheduler(sched, self.blocks)
        self.images = RequestImages(model, config.image_cache_blocks) if isinstance(model, VisionMoEGPT) else None
        images = None if self.images is None else self.images.cache
        self.runner = (ModelRunner(model, self.cache, images) if shards is None
                       else shards.runner(model, self.cache, images))
        self.drafter = None
        if self.draft is not None:
            dparam = compute_weight(self.draft)
            self.drafter = DraftModelProposer(ModelRunner(self.draft, PagedKVCache(
                self.draft.cfg, num_blocks, config.block_size, dparam.dtype, dparam.device, config.kv_cache_dtype)))
        self.max_len = min(model.cfg.max_seq_len, self.draft.cfg.max_seq_len if self.draft else model.cfg.max_seq_len)
        self.live: dict[int, _Live] = {}  # seq_id -> its completion
        self.request_seqs: dict[int, list[int]] = {}  # request_id -> seq_ids of its n completions
        self.stats = EngineStats(kv_blocks_total=num_blocks, kv_blocks_free=num_blocks)
        self._unclaimed: list[StepUpdate] = []  # updates that stream()/generate() saw for other requests
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()

    @property
    def has_work(self) -> bool:
        """Requests to run, or updates that ``stream()``/``generate()`` kept for the next ``step()``."""
        return self.scheduler.has_work or bool(self._unclaimed)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, images: Seq[torch.Tensor] = ()) -> int:
        """Queue a request (its ``params.n`` completions); checks everything before anything is stored.
        ``images``: pixel values (C, S, S) of the prompt's images, one per image token, in order."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if self.images is None and images:
            raise ValueError(f"this model has no vision part: it takes no images ({len(images)} given)")
        image_positions = self.images.positions(prompt_ids, images, self.tokenizer) if self.images is not None else []
        bad = [t for t in prompt_ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model.cfg.vocab_size})")
        max_tokens = self.max_len - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        if len(prompt_ids) + max(max_tokens, 1) > self.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"context ({self.max_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        digests = [image_digest(p) for p in images]
        image_keys = tuple(zip(image_positions, digests))
        seqs = [Sequence(seq_id=next(self._seq_ids), prompt_ids=list(prompt_ids), max_tokens=max_tokens,
                         image_keys=image_keys) for _ in range(params.n)]
        for seq in seqs:
            self.scheduler.check_fits(seq)  # raises if it can never fit in the KV cache
        blocks = self.images.acquire(images, digests, params.n) if images else [()] * params.n
        rid = next(self._request_ids)
        stop_ids = frozenset(params.stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None and not params.ignore_eos:
            stop_ids = stop_ids | {self.tokenizer.eos_id}
        for index, seq in enumerate(seqs):
            detok = Detokenizer(self.tokenizer.decode, params.stop) if self.tokenizer is not None else None
            generator = _generator(params.seed, index, self.cache.k[0].device)
            self.live[seq.seq_id] = _Live(seq=seq, request_id=rid, index=index, params=params, generator=generator,
                                          stop_ids=stop_ids, detok=detok, image_blocks=blocks[index])
            self.scheduler.add(seq)
        self.request_seqs[rid] = [s.seq_id for s in seqs]
        self._refresh_stats()
        return rid

    def _forget(self, sid: int) -> None:
        """A completion is done (finished or aborted): drop it and let go of its images."""
        live = self.live.pop(sid, None)
        if live is not None and live.image_blocks:
            self.images.release(live.image_blocks)

    def abort(self, request_id: int) -> None:
        """Stop a request now and free its KV blocks (a no-op for an unknown or finished request)."""
        for sid in self.request_seqs.pop(request_id, []):
            if self.scheduler.abort(sid) is not None:
                self.stats.aborted += 1
            self._forget(sid)
        self._refresh_stats()

    def heartbeat(self) -> None:
        """While idle: a sharded model's other ranks hear that rank 0 is alive (and a rank that died
        is found: infer/sharded.py's ShardFailure). Nothing to do on one process."""
        ping = getattr(self.runner, "ping", None)
        if ping is not None:
            ping()

    # ---- stepping ------------------------------------------------------------------------------
    def step(self) -> list[StepUpdate]:
        updates, self._unclaimed = self._unclaimed, []
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        if batch.entries:
            updates += self._run(batch)
        self._refresh_stats()
        return updates

    def _run(self, batch: Batch) -> list[StepUpdate]:
        proposals = self._propose(batch)
        chunks = []
        for e in batch.entries:
            drafts = proposals[e.seq.seq_id].tokens if e.seq.seq_id in proposals else ()
            tokens = tuple(e.seq.token_ids[e.start:e.start + e.num_tokens]) + drafts
            images = tuple((pos, b) for (pos, _), b in zip(e.seq.image_keys, self.live[e.seq.seq_id].image_blocks))
            chunks.append(Chunk(tokens=tokens, start=e.start, block_table=tuple(e.seq.block_table),
                                num_logits=(1 + len(drafts)) if e.samples_next_token else 0, seq_id=e.seq.seq_id,
                                images=images))
            self.stats.prompt_tokens += max(0, min(e.start + e.num_tokens, len(e.seq.prompt_ids)) - e.start)
        out = self.runner.run(chunks)
        self.stats.steps += 1
        if out.expert_counts is not None:
            counts = out.expert_counts.cpu()
            self.stats.last_expert_counts = counts
            self.stats.expert_tokens = counts if self.stats.expert_tokens is None else self.stats.expert_tokens + counts

        sampled: dict[int, list[int]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        row = 0
        no_proposal = Proposal(tokens=(), probs=None)
        argmaxes = None  # every row's argmax, taken once for the plain greedy sequences (one op, not one each)
        for e, chunk in zip(batch.entries, chunks):
            if not chunk.num_logits:
                continue
            live = self.live[e.seq.seq_id]
            rows = out.logits[row:row + chunk.num_logits]  # (k+1, V)
            proposal = proposals.get(e.seq.seq_id, no_proposal)
            if live.params.greedy and not live.params.has_penalties and not proposal.tokens:
                argmaxes = greedy(out.logits).tolist() if argmaxes is None else argmaxes
                tokens = [argmaxes[row]]
            else:
                tokens = self._sample(live, rows, proposal)
            row += chunk.num_logits
            self.stats.spec_proposed += len(proposal.tokens)
            self.stats.spec_accepted += len(tokens) - 1
            sampled[e.seq.seq_id] = tokens
            if live.params.logprobs is not None:
                logprobs[e.seq.seq_id] = [top_logprobs(rows[i], t, live.params.logprobs) for i, t in enumerate(tokens)]

        before = {sid: len(self.live[sid].seq.output_ids) for sid in sampled}
        self.scheduler.update(batch, sampled, {sid: self.live[sid].stop_ids for sid in sampled})
        if self.draft is not None:
            for e in batch.entries:
                e.seq.num_draft_computed = min(e.seq.num_draft_computed, e.seq.num_computed)
        return [self._emit(sid, before[sid], logprobs.get(sid)) for sid in sampled]

    def _sample(self, live: _Live, rows: torch.Tensor, proposal: Proposal) -> list[int]:
        """rows (k+1, V): the target's logits after the last token and after each draft token."""
        params, seq = live.params, live.seq
        logits = rows
        if params.has_penalties:
            history = list(seq.output_ids)
            logits = torch.stack([apply_penalties(rows[i], params, seq.prompt_ids, history + list(proposal.tokens[:i]))
                                  for i in range(rows.shape[0])])  # (k+1, V)
        if not proposal.tokens:
            return [int(sample(logits, params, live.generator)[0])]
        if params.greedy:  # verify's rule with one-hot target distributions, in one argmax
            return verify_greedy(greedy(logits).tolist(), proposal)
        return verify(filtered_probs(logits, params), proposal, live.generator)

    def _emit(self, sid: int, before: int, logprobs: list[TokenLogprob] | None) -> StepUpdate:
        """The update for one sequence after the scheduler appended its tokens: text, stop strings."""
        live = self.live[sid]
        seq = live.seq
        new = seq.output_ids[before:]
        text = ""
        if live.detok is not None:
            for i, t in enumerate(new):
                if seq.finish_reason == FinishReason.STOP and i == len(new) - 1 and t in live.stop_ids:
                    break  # a stop token's own text is not part of the output
                text += live.detok.add([t])
                if live.detok.stopped:  # a stop string: the sequence ends at this token
                    del seq.output_ids[before + i + 1:]
                    new = new[:i + 1]
                    if not seq.is_finished:
                        self.scheduler.finish(sid, FinishReason.STOP)
                    seq.finish_reason = FinishReason.STOP
                    break
            if seq.is_finished and not live.detok.stopped:
                text += live.detok.flush()
        self.stats.generation_tokens += len(new)
        update = StepUpdate(request_id=live.request_id, index=live.index, new_token_ids=tuple(new), text=text,
                            logprobs=tuple(logprobs[:len(new)]) if logprobs is not None else None,
                            finish_reason=seq.finish_reason)
        if seq.is_finished:
            self._forget(sid)
            siblings = self.request_seqs.get(live.request_id, [])
            if all(s not in self.live for s in siblings):
                self.request_seqs.pop(live.request_id, None)
        return update

    # ---- speculative proposals -----------------------------------------------------------------
    def _propose(self, batch: Batch) -> dict[int, Proposal]:
        if self.spec is None:
            return {}
        if self.drafter is None:
            ngram = self.spec.ngram
            return {e.seq.seq_id: ngram.propose(e.seq.token_ids, e.lookahead)
                    for e in batch.entries if e.samples_next_token and e.lookahead > 0}
        return self.drafter.propose(batch, lambda sid: (self.live[sid].params, self.live[sid].generator))

    # ---- conveniences --------------------------------------------------------------------------
    def _step_for(self, request_ids: set[int]) -> list[StepUpdate]:
        """Step the engine; the updates of ``request_ids``. The others' are kept for ``step()``."""
        mine = []
        for update in self.step():
            (mine if update.request_id in request_ids else self._unclaimed).append(update)
        return mine

    def stream(self, prompt_ids: Seq[int], params: SamplingParams, images: Seq[torch.Tensor] = ()) -> Iterator[StepUpdate]:
        """Add a request and step the engine until it finishes, yielding its updates as they come.
        Other requests progress too; their updates are kept for the next ``step()`` call."""
        rid = self.add_request(prompt_ids, params, images)
        pending = set(range(params.n))  # completions not finished yet
        try:
            while pending:
                for update in self._step_for({rid}):
                    if update.finish_reason is not None:
                        pending.discard(update.index)
                    yield update
        finally:  # closed early, interrupted or failed: the request must not stay in the engine
            if pending:
                self._drop({rid})

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 on_output: Callable[[RequestOutput], None] | None = None,
                 images: Seq[Seq[torch.Tensor]] | None = None) -> list[RequestOutput]:
        """Run ``prompts`` (token ids; one ``params`` for all, or one per prompt) to completion together,
        beside whatever else the engine runs; their outputs, in order. ``on_output`` sees each request's
        output as it finishes (a progress bar). ``images``: each prompt's images (a vision model)."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        per_images = [()] * len(prompts) if images is None else list(images)
        if len(per_images) != len(prompts):
            raise ValueError(f"{len(per_images)} image lists for {len(prompts)} prompts")
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        collectors = {}
        try:
            for p, sp, im in zip(prompts, per_prompt, per_images):
                rid = self.add_request(p, sp, im)
                collectors[rid] = OutputCollector(rid, p, sp.n, sp.logprobs is not None, decode=decode)
        except ValueError:
            for rid in collectors:  # all or none
                self.abort(rid)
            raise
        pending = set(collectors)
        try:
            while pending:
                for update in self._step_for(pending):
                    c = collectors[update.request_id]
                    c.add(update)
                    if c.finished:
                        pending.discard(update.request_id)
                        if on_output is not None:
                            on_output(c.output())
        finally:  # interrupted or failed: the requests must not stay in the engine
            self._drop(pending)
        return [c.output() for c in collectors.values()]

    def _drop(self, request_ids: set[int]) -> None:
        """Abort requests a caller gave up on, and forget the updates kept for them."""
        for rid in request_ids:
            self.abort(rid)
        self._unclaimed = [u for u in self._unclaimed if u.request_id not in request_ids]

    def _refresh_stats(self) -> None:
        s = self.stats
        s.running, s.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.waiting_tokens = self.scheduler.num_waiting_tokens
        s.kv_blocks_free = self.blocks.num_free_blocks
        if self.images is not None:
            blocks = self.images.cache.blocks
            s.images_encoded, s.image_cache_hits = blocks.stats.encoded, blocks.stats.hits
            s.image_blocks_total, s.image_blocks_used = blocks.num_blocks, blocks.num_blocks - blocks.num_free
