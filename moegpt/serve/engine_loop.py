"""The engine's own thread: the one place that calls ``LLMEngine`` (which is not thread-safe).

The asyncio side sends commands (add a group of requests, abort one) through a thread-safe queue;
the thread runs them between engine steps, steps the engine while it has work, and hands each
step's updates back to the event loop in one ``call_soon_threadsafe`` per step, into the queue of
the HTTP request they belong to. Every client therefore shares the engine's continuous batches, and
an abort lands before the next step: its KV blocks are free within one step.

Admission control happens here too, where the engine's queue is exact: a group is refused (429)
when the sequences or the prompt tokens waiting would pass the limits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from moegpt.infer.engine import EngineStats, LLMEngine
from moegpt.infer.image_cache import ImageCacheFull
from moegpt.infer.outputs import StepUpdate
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.sharded import ShardFailure

log = logging.getLogger("moegpt.serve")

HEARTBEAT_S = 1.0  # idle: how often a sharded model's other ranks hear from rank 0


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_queued_requests: int = 256  # sequences waiting in the engine (a request with n=4 counts 4)
    max_queued_tokens: int = 1 << 18  # prompt tokens waiting in the engine

    def __post_init__(self):
        if self.max_queued_requests < 1 or self.max_queued_tokens < 1:
            raise ValueError(f"max_queued_requests ({self.max_queued_requests}) and max_queued_tokens "
                             f"({self.max_queued_tokens}) must be >= 1")


def admission_refusal(limits: Limits, waiting: int, waiting_tokens: int, new_seqs: int, new_tokens: int) -> str | None:
    """Why a group cannot be queued now (None: it can). An empty queue always takes one group, so a
    large request is never refused forever."""
    if waiting == 0:
        return None
    if waiting + new_seqs > limits.max_queued_requests:
        return f"the queue is full ({waiting} sequences waiting, limit {limits.max_queued_requests})"
    if waiting_tokens + new_tokens > limits.max_queued_tokens:
        return f"the queue is full ({waiting_tokens} prompt tokens waiting, limit {limits.max_queued_tokens})"
    return None


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class Failed:
    """The last event of a stream that ends without finishing (shutdown, or an engine failure)."""

    message: str


@dataclass(frozen=True)
class Snapshot:
    """The engine's counters after a loop turn, for /metrics (read from any thread)."""

    running: int
    waiting: int
    waiting_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int
    steps: int
    preemptions: int
    aborted: int
    prompt_tokens: int
    generation_tokens: int
    spec_proposed: int
    spec_accepted: int
    expert_tokens: tuple[tuple[int, ...], ...] | None  # (Lm, E) since start
    last_expert_counts: tuple[tuple[int, ...], ...] | None  # (Lm, E) of the last step
    images_encoded: int = 0
    image_cache_hits: int = 0
    image_blocks_total: int = 0
    image_blocks_used: int = 0

    @classmethod
    def of(cls, s: EngineStats) -> Snapshot:
        def rows(t):
            return None if t is None else tuple(tuple(int(x) for x in row) for row in t.tolist())

        return cls(s.running, s.waiting, s.waiting_tokens, s.kv_blocks_total, s.kv_blocks_free, s.steps,
                   s.preemptions, s.aborted, s.prompt_tokens, s.generation_tokens, s.spec_proposed,
                   s.spec_accepted, rows(s.expert_tokens), rows(s.last_expert_counts), s.images_encoded,
                   s.image_cache_hits, s.image_blocks_total, s.image_blocks_used)


@dataclass
class Stream:
    """One HTTP request's generation: its engine requests (one per prompt) and the events for it."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt
    arrival: float  # time.monotonic() when the HTTP request came in
    images: list[list] = field(default_factory=list)  # each prompt's images (pixel values), or none
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepUpdate | Failed
    request_ids: list[int] = field(default_factory=list)  # engine ids, in prompt order (set by the thread)
    # engine-thread bookkeeping
    unfinished: set[tuple[int, int]] = field(default_factory=set)  # (request_id, index) still running
    last_token_at: dict[tuple[int, int], float] = field(default_factory=dict)
    first_token_seen: bool = False
    released: bool = False  # the HTTP side is done with it

    @property
    def num_choices(self) -> int:
        return sum(p.n for p in self.params)


@dataclass(frozen=True)
class _Add:
    stream: Stream
    done: asyncio.Future


@dataclass(frozen=True)
class _Abort:
    stream: Stream


class _Stop:
    pass


class EngineLoop:
    def __init__(self, engine: LLMEngine, limits: Limits = Limits(), metrics=None):
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.snapshot = Snapshot.of(engine.stats)
        self.draining = False  # no new requests (503): set on SIGTERM, or when a rank failed
        self.fatal: str | None = None  # why the engine cannot go on (a rank of a sharded model failed)
        self.on_fatal = None  # called (from the engine thread) when it happens: the server stops
        self.in_flight = 0  # HTTP requests submitted and not yet released (asyncio side only)
        self._streams: dict[int, Stream] = {}  # engine request_id -> its stream (engine thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- asyncio side ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="moegpt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs (its streams get ``Failed``) and end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self.commands.put(_Stop())
            self._thread.join(timeout)

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams], arrival: float,
                     images: list[list] | None = None) -> Stream:
        """Queue one engine request per prompt (with its ``images``' pixel values), all or none. Raises
        ShuttingDown, QueueFull (also when the image cache is full), or ValueError (bad input, one
        line). The caller must ``release`` the stream when done."""
        if self.draining:
            raise ShuttingDown(self.fatal or "the server is shutting down")
        stream = Stream(prompts, params, arrival, images or [])
        done = asyncio.get_running_loop().create_future()
        self.in_flight += 1
        self.commands.put(_Add(stream, done))
        try:
            await done  # raises what the engine thread refused with
        except BaseException:
            self.release(stream)  # also when cancelled while waiting: the thread may have added it
            raise
        return stream

    def release(self, stream: Stream) -> None:
        """The HTTP side is done: abort what still runs (a no-op for finished requests)."""
        if not stream.released:
            stream.released = True
            self.in_flight -= 1
            self.commands.put(_Abort(stream))

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            # Idle: sleep until a command comes (a heartbeat to the other ranks each second). Busy:
            # take what is there and step.
            try:
                commands = [] if self.engine.has_work else [self._next_command()]
            except ShardFailure as e:
                return self._die(e)
            while True:
                try:
                    commands.append(self.commands.get_nowait())
                except queue.Empty:
                    break
            for cmd in commands:
                if isinstance(cmd, _Stop):
                    self._fail_all("the server is shutting down")
                    self.snapshot = Snapshot.of(self.engine.stats)
                    return
                try:
                    self._add(cmd) if isinstance(cmd, _Add) else self._abort(cmd.stream)
                except Exception as e:  # an engine bug: this request fails (500), the server goes on
                    log.exception("engine command failed")
                    if isinstance(cmd, _Add):
                        self._reply(cmd.done, RuntimeError(f"internal error: {type(e).__name__}"))
            if self.engine.has_work:
                try:
                    self._dispatch(self.engine.step(), time.monotonic())
                except ShardFailure as e:  # a rank died or timed out: nothing can run any more
                    return self._die(e)
                except Exception:  # an engine bug: fail the running requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all("internal error in the engine step")
            self.snapshot = Snapshot.of(self.engine.stats)

    def _next_command(self):
        while True:
            try:
                return self.commands.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                self.engine.heartbeat()

    def _die(self, error: ShardFailure) -> None:
        """The sharded model lost a rank: every stream fails (503), new requests get 503, the server stops."""
        log.error("%s", error)
        self.fatal = f"the model is unavailable: {error}"
        self.draining = True
        self._fail_all(self.fatal)
        while True:  # refuse what was queued meanwhile
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                self._reply(cmd.done, ShuttingDown(self.fatal))
        self.snapshot = Snapshot.of(self.engine.stats)
        if self.on_fatal is not None:
            self.on_fatal()

    def _reply(self, done: asyncio.Future, error: BaseException | None) -> None:
        def settle():
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(None)
        self._loop.call_soon_threadsafe(settle)

    def _add(self, cmd: _Add) -> None:
        stream, s = cmd.stream, self.engine.stats
        if self.draining:
            return self._reply(cmd.done, ShuttingDown(self.fatal or "the server is shutting down"))
        refusal = admission_refusal(self.limits, s.waiting, s.waiting_tokens, stream.num_choices,
                                    sum(len(prompt) * p.n for prompt, p in zip(stream.prompts, stream.params)))
        if refusal is not None:
            return self._reply(cmd.done, QueueFull(refusal))
        try:
            for i, (prompt, params) in enumerate(zip(stream.prompts, stream.params)):
                rid = self.engine.add_request(prompt, params, stream.images[i] if stream.images else ())
                stream.request_ids.append(rid)
                self._streams[rid] = stream
                stream.unfinished.update((rid, i) for i in range(params.n))
        except (ValueError, ImageCacheFull) as e:
            for rid in stream.request_ids:  # all or none
                self.engine.abort(rid)
                self._streams.pop(rid, None)
            stream.request_ids.clear()
            stream.unfinished.clear()
            return self._reply(cmd.done, QueueFull(str(e)) if isinstance(e, ImageCacheFull) else ValueError(str(e)))
        self._reply(cmd.done, None)

    def _abort(self, stream: Stream) -> None:
        for rid in stream.request_ids:
            if self._streams.pop(rid, None) is not None:
                self.engine.abort(rid)
        if stream.unfinished and self.metrics is not None:
            self.metrics.finished.labels("abort").inc(len(stream.unfinished))
        stream.unfinished.clear()

    def _fail_all(self, message: str) -> None:
        failed = {id(s): s for s in self._streams.values()}.values()
        for stream in failed:
            self._abort(stream)
        if failed:
            self._loop.call_soon_threadsafe(_deliver, [(s, Failed(message)) for s in failed])

    def _dispatch(self, updates: list[StepUpdate], now: float) -> None:
        out: list[tuple[Stream, StepUpdate]] = []
        for u in updates:
            stream = self._streams.get(u.request_id)
            if stream is None:
                continue  # aborted meanwhile
            key = (u.request_id, u.index)
            if u.new_token_ids and self.metrics is not None:
                if not stream.first_token_seen:
                    self.metrics.ttft.observe(now - stream.arrival)
                elif key in stream.last_token_at:
                    self.metrics.itl.observe(now - stream.last_token_at[key])
            if u.new_token_ids:
                stream.first_token_seen = True
                stream.last_token_at[key] = now
            if u.finish_reason is not None:
                stream.unfinished.discard(key)
                if self.metrics is not None:
                    self.metrics.finished.labels(u.finish_reason.value).inc()
                if not any(k[0] == u.request_id for k in stream.unfinished):
                    self._streams.pop(u.request_id, None)
                if not stream.unfinished and self.metrics is not None:
                    self.metrics.e2e.observe(now - stream.arrival)
            out.append((stream, u))
        if out:
            self._loop.call_soon_threadsafe(_deliver, out)


def _deliver(items: list[tuple[Stream, object]]) -> None:
    for stream, event in items:
        if not stream.released:
            stream.events.put_nowait(event)
