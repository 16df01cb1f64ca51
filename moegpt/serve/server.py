"""Running the server: load a model directory, start the engine loop under uvicorn, stop gracefully.

SIGTERM (or Ctrl-C): new requests get 503 at once, requests in flight run to the end for up to
``shutdown_timeout`` seconds (then they are aborted), and ``serve`` returns 0. A second signal stops
at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from moegpt.infer.engine import EngineConfig
from moegpt.infer.llm import LLM
from moegpt.serve.app import Served, build_app
from moegpt.serve.body import DEFAULT_MAX_REQUEST_BYTES
from moegpt.data.chat import chat_format
from moegpt.serve.engine_loop import EngineLoop, Limits
from moegpt.serve.metrics import Metrics


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    model_dir: str
    draft_dir: str | None = None
    model_name: str | None = None  # None: the model directory's name
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = Limits()
    shutdown_timeout: float = 30.0
    log_level: str = "warning"
    api_key: str | None = None  # None: /v1/* is open to anyone who reaches the port
    chat_template: str | None = None  # Jinja text; None: the tokenizer's own
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


def model_dtypes(llm: LLM) -> dict[str, str]:
    """/metrics' moegpt:model_dtypes labels: the weights' dtype or quantization scheme, the activations',
    the KV cache's."""
    from moegpt.quant.model import model_scheme

    text = getattr(llm.model, "text", llm.model)  # a vision model's language model
    scheme = model_scheme(text)
    activations = str(text.norm.weight.dtype).removeprefix("torch.")
    return {"weights": activations if scheme is None else scheme.name, "activations": activations,
            "kv_cache": llm.engine.cache.dtype_name}


def serve(options: ServerOptions, config: EngineConfig = EngineConfig(), shards=None) -> int:
    """Serve until SIGTERM (0), or until a rank of a sharded model fails (``shards``: rank 0's
    ShardedWorld, infer/sharded.py): streams and new requests get 503, and it returns 1."""
    # checks the directories, tokenizer and draft
    llm = LLM(options.model_dir, config, draft_model=options.draft_dir, shards=shards)
    loop = EngineLoop(llm.engine, options.limits)
    metrics = Metrics(lambda: loop.snapshot, model_dtypes(llm))
    loop.metrics = metrics
    name = options.model_name or Path(options.model_dir).resolve().name
    served = Served(model_name=name, tokenizer=llm.tokenizer, chat=chat_format(llm.tokenizer, options.chat_template),
                    context=llm.engine.max_len, engine=loop, metrics=metrics, created=int(time.time()),
                    max_request_bytes=options.max_request_bytes, api_key=options.api_key,
                    image_processing=llm.image_processing,
                    max_images=llm.model.vision_cfg.max_images if llm.image_processing is not None else 0)
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uv = uvicorn.Config(build_app(served), host=options.host, port=options.port, log_level=options.log_level,
                        access_log=False, timeout_graceful_shutdown=5, lifespan="on")
    server = GracefulServer(uv, loop, options.shutdown_timeout)
    loop.on_fatal = server.stop_now
    print(f"moegpt: serving {name!r} on http://{options.host}:{options.port} (context {llm.engine.max_len}, "
          f"{llm.engine.stats.kv_blocks_total} KV blocks of {config.block_size} tokens)", flush=True)
    server.run()
    if loop.fatal is not None:
        print(f"moegpt: error: {loop.fatal}", file=sys.stderr, flush=True)
        return 1
    if not server.started:
        return 1
    print("moegpt: server stopped", flush=True)
    return 0


class GracefulServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains: 503 for new requests while in-flight ones finish."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, drain_timeout: float):
        super().__init__(config)
        self.engine_loop, self.drain_timeout = engine_loop, drain_timeout
        self._draining = False

    def stop_now(self) -> None:
        """From any thread: close the sockets and return from ``run`` (the engine cannot go on)."""
        self.force_exit = self.should_exit = True

    def handle_exit(self, sig, frame):
        # Not uvicorn's: it would stop at once, and re-raise the signal after stopping (no exit 0).
        if self._draining:  # a second signal: stop now
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        self.engine_loop.draining = True
        print(f"moegpt: signal {sig}: draining for up to {self.drain_timeout:g} s; new requests get 503",
              file=sys.stderr, flush=True)
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self):
        deadline = time.monotonic() + self.drain_timeout
        while self.engine_loop.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Abort what is left (its streams end with an error), then let uvicorn close the sockets.
        await asyncio.to_thread(self.engine_loop.stop)
        self.should_exit = True
