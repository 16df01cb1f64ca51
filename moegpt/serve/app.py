"""The routes: parse the OpenAI request, turn it into engine requests, hand them to the engine loop,
and turn the updates that come back into OpenAI responses. No scheduling happens here.

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.outputs import StepUpdate
from moegpt.serve.auth import RequireAPIKey
from moegpt.serve.body import DEFAULT_MAX_REQUEST_BYTES, read_body
from moegpt.data.chat import ChatFormat
from moegpt.data.images import ImageLimits, ImageProcessing
from moegpt.serve.engine_loop import EngineLoop, Failed, QueueFull, ShuttingDown, Stream
from moegpt.serve.images import request_images
from moegpt.serve.errors import APIError, bad_request, error_body, error_response
from moegpt.serve.metrics import Metrics
from moegpt.serve.output import DONE, Choice, Response as Reply, TokenText, collect, sse
from moegpt.serve.protocol import (COMPLETIONS_DEFAULT_MAX_TOKENS, MAX_N, ChatCompletionRequest, CompletionRequest,
                                   check_model, engine_request, parse)

log = logging.getLogger("moegpt.serve")
RETRY_AFTER_S = 1
REJECTION = {400: "invalid", 404: "unknown_model", 413: "too_large", 429: "queue_full", 503: "shutting_down"}  # metric labels


@dataclass(frozen=True, kw_only=True)
class Served:
    """What the routes need: the model's name and tokenizer, the engine loop, the metrics, the limits."""

    model_name: str
    tokenizer: Tokenizer
    chat: ChatFormat | None
    context: int  # the engine's longest sequence (prompt + completion)
    engine: EngineLoop
    metrics: Metrics
    created: int
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413
    api_key: str | None = None  # None: open; else /v1/* needs "Authorization: Bearer <api_key>"
    image_processing: ImageProcessing | None = None  # a vision model's; None: the model takes no images
    image_limits: ImageLimits = ImageLimits()
    max_images: int = 8  # per request


def build_app(served: Served) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(served.engine.stop)

    app = FastAPI(title="moegpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if served.api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=served.api_key)
    text = TokenText(served.tokenizer)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        served.metrics.rejected.labels(REJECTION.get(e.status, str(e.status))).inc()
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(error_body(400, f"invalid request: {e.errors()[0].get('msg', 'bad input')}"), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind),
                            e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "internal server error", "server_error"), 500)

    # ---- endpoints ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if served.engine.draining:
            return JSONResponse(error_body(503, served.engine.fatal or "the server is shutting down", "server_error"),
                                503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": served.created,
                                            "owned_by": "moegpt", "max_model_len": served.context}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        arrival = time.monotonic()
        _admitting(served)
        req = parse(CompletionRequest, await _body(served, request))
        check_model(req.model, served.model_name)
        prompts = _completion_prompts(req.prompt, served.tokenizer)
        if len(prompts) * (req.n or 1) > MAX_N:
            raise bad_request(f"{len(prompts)} prompts x n={req.n or 1} is more than {MAX_N} completions", "n")
        engine_req = engine_request(req, req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, req.logprobs)
        reply = Reply(False, served.model_name, text, req.logprobs is not None, sum(map(len, prompts)))
        return await _generate(served, request, prompts, [engine_req] * len(prompts), reply, arrival,
                               bool(req.stream), req.include_usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        arrival = time.monotonic()
        _admitting(served)
        req = parse(ChatCompletionRequest, await _body(served, request))
        check_model(req.model, served.model_name)
        if served.chat is None:
            raise bad_request(f"the model '{served.model_name}' has no chat template; use /v1/completions")
        images = request_images([u for m in req.messages for u in m.image_urls()], served.image_processing,
                                served.image_limits, served.max_images, served.model_name)
        try:
            prompt_text = served.chat.render([{"role": m.role, "content": m.text()} for m in req.messages])
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        prompt = served.tokenizer.encode(prompt_text)  # no special tokens: the template writes them
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, served.context - len(prompt))
        logprobs = req.logprobs_count()
        engine_req = engine_request(req, max_tokens, logprobs, served.chat.stop_token_ids)
        reply = Reply(True, served.model_name, text, logprobs is not None, len(prompt))
        return await _generate(served, request, [prompt], [engine_req], reply, arrival, bool(req.stream),
                               req.include_usage(), [images])

    return app


async def _body(served: Served, request: HTTPRequest) -> bytes:
    return await read_body(request.headers, request.stream(), served.max_request_bytes)


def _admitting(served: Served) -> None:
    if served.engine.draining:
        raise APIError(503, served.engine.fatal or "the server is shutting down", "server_error")


def _completion_prompts(prompt, tokenizer: Tokenizer) -> list[list[int]]:
    """OpenAI's four prompt forms -> token id lists. Text gets the tokenizer's own special tokens (as
    AutoTokenizer and vLLM add them); token ids are taken as given."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    out = []
    for p in prompt:
        if not p:
            raise bad_request("the prompt is empty", "prompt")
        out.append(tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p))
    return out


async def _generate(served: Served, request: HTTPRequest, prompts: list[list[int]], engine_reqs, reply: Reply,
                    arrival: float, streaming: bool, include_usage: bool, images: list[list] | None = None):
    try:
        stream = await served.engine.submit(prompts, engine_reqs, arrival, images)
    except ShuttingDown as e:
        raise APIError(503, str(e), "server_error") from None
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ValueError as e:
        raise bad_request(str(e)) from None
    n = engine_reqs[0].n
    index_of = {rid: p * n for p, rid in enumerate(stream.request_ids)}  # choice = prompt * n + i
    choices = [Choice() for _ in range(stream.num_choices)]
    if streaming:
        return EventStream(_sse_events(stream, served, reply, choices, index_of, include_usage),
                           lambda: served.engine.release(stream))
    try:
        return await _until_done_or_gone(request, _whole(stream, reply, choices, index_of))
    finally:
        served.engine.release(stream)


async def _updates(stream: Stream) -> AsyncIterator[StepUpdate]:
    """The stream's updates until every choice finished; raises APIError(503) on ``Failed``."""
    remaining = stream.num_choices
    while remaining:
        event = await stream.events.get()
        if isinstance(event, Failed):
            raise APIError(503, event.message, "server_error")
        if event.finish_reason is not None:
            remaining -= 1
        yield event


async def _whole(stream: Stream, reply: Reply, choices: list[Choice], index_of: dict[int, int]) -> dict:
    async for u in _updates(stream):
        collect(choices[index_of[u.request_id] + u.index], u)
    return reply.whole(choices)


async def _until_done_or_gone(request: HTTPRequest, work) -> dict:
    """Await ``work``, unless the client disconnects first (then it is cancelled; the caller aborts)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return task.result()


async def _sse_events(stream: Stream, served: Served, reply: Reply, choices: list[Choice],
                      index_of: dict[int, int], include_usage: bool) -> AsyncIterator[str]:
    if reply.chat:
        for i in range(len(choices)):
            yield reply.role_chunk(i, include_usage)
    try:
        async for u in _updates(stream):
            index = index_of[u.request_id] + u.index
            chunk = reply.update_chunk(index, u, choices[index], include_usage)
            collect(choices[index], u)
            if chunk is not None:
                yield chunk
    except APIError as e:
        yield sse(error_body(e.status, e.message, e.type))
        yield DONE
        return
    if include_usage:
        yield reply.usage_chunk(sum(c.num_tokens for c in choices))
    yield DONE


class EventStream(Response):
    """Server-sent events from an async iterator. Watches for the client going away while streaming,
    and calls ``on_close`` however the stream ends (finished, disconnected, failed), exactly once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close):
        # Not Response.__init__: that would announce a content-length of 0.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone():
            while (await receive())["type"] != "http.disconnect":
                pass

        sender, watcher = asyncio.ensure_future(pump()), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sender, watcher):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):  # OSError: the client went away
                await sender
            with contextlib.suppress(BaseException):
                await self.events.aclose()
            self.on_close()
