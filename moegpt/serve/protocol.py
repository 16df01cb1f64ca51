"""OpenAI request schemas (pydantic) and their translation into the engine's SamplingParams.

Strict types: ``"1"`` is not a number and ``1`` is not a boolean, as in OpenAI's API. Unknown fields
are ignored, as OpenAI ignores them; known fields this server does not implement (tools, logit_bias,
...) are refused with a 400 naming the field, never silently dropped.
Extras beyond OpenAI's fields (as vLLM names them): top_k, min_p, repetition_penalty, ignore_eos.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moegpt.data.vision_data import image_marker
from moegpt.infer.sampling_params import MAX_LOGPROBS, SamplingParams
from moegpt.serve.body import load_json
from moegpt.serve.errors import APIError, bad_request

MAX_N = 128  # completions per prompt
MAX_STOP = 4  # stop strings per request, as OpenAI
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: up to the context)

# Known OpenAI fields this server does not implement, and the values that mean "not used".
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False),
    "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "response_format": (None, {"type": "text"}), "web_search_options": (None,),
}

Float = Annotated[float, Field(allow_inf_nan=False)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampling(_Schema):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM: -1 (or 0) for no top-k
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop: stop strings must be non-empty", "stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ImageURL(_Schema):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Schema):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as the chat template gets it: each image part its image token and a line
        break (as vision training renders a picture), text parts as they are."""
        if isinstance(self.content, list):
            return "".join(p.text if isinstance(p, TextPart) else image_marker() for p in self.content)
        return self.content or ""

    def image_urls(self) -> list[str]:
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)] if isinstance(self.content, list) else []


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def parse(schema: type[_Schema], body: bytes) -> _Schema:
    """Raw request body -> a validated schema; 400 with a one-line reason otherwise."""
    raw = load_json(body)  # 400 for anything json cannot take (depth, digits, bytes)
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object")
    for name, unused in UNSUPPORTED.items():
        if name in raw and raw[name] not in unused:
            raise bad_request(f"'{name}' is not supported by this server", name)
    if isinstance(raw.get("messages"), list):
        for i, m in enumerate(raw["messages"]):
            if isinstance(m, dict) and m.get("role") in ("tool", "function"):
                raise bad_request(f"messages[{i}]: role '{m['role']}' is not supported by this server (no tools)",
                                  "messages")
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                for part in m["content"]:
                    if isinstance(part, dict) and part.get("type") not in (None, "text", "image_url"):
                        raise bad_request(f"messages[{i}]: content of type {part.get('type')!r} is not supported "
                                          f"by this server (text and image_url only)", "messages")
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise bad_request(_describe(e), _param(e)) from None


def _is_tag(part) -> bool:
    """A union member's tag in an error location ('str', 'list[int]', ...), not a field name."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none")
                                      or part.startswith(("function-", "constrained-")))


def _path(err: dict) -> list:
    return [p for p in err["loc"] if not _is_tag(p)]


def _param(e: ValidationError) -> str | None:
    path = _path(e.errors()[0])
    return str(path[0]) if path else None


def _describe(e: ValidationError) -> str:
    """The first problem in one line, e.g. "temperature: Input should be less than or equal to 2"."""
    errors = e.errors()
    first = errors[0]
    where = ".".join(str(p) for p in _path(first)) or "body"
    if first["type"] == "missing":
        return f"'{where}' is a required field"
    # A union (prompt, stop, content) reports one error per alternative: prefer one about the value
    # (too long, out of range) over type mismatches, then the deepest; if every alternative fails
    # right at the field, list what it accepts.
    alts = [err for err in errors if _path(err)[:1] == _path(first)[:1]]
    if len(alts) > 1:
        about_value = [a for a in alts if not a["type"].endswith("_type")]
        best = about_value[0] if about_value else max(alts, key=lambda a: len(_path(a)))
        if not about_value and _path(best) == _path(first):
            tags = [next((p for p in a["loc"] if _is_tag(p)), "?") for a in alts]
            return f"{where}: expected one of {', '.join(tags)}"
        return f"{'.'.join(str(p) for p in _path(best))}: {best['msg']}"
    return f"{where}: {first['msg']}"


def engine_request(req: _Sampling, max_tokens: int, logprobs: int | None,
                   stop_token_ids: frozenset[int] = frozenset()) -> SamplingParams:
    """The engine's SamplingParams for one prompt; range errors the engine finds become 400s."""
    try:
        return SamplingParams(
            n=req.n or 1, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p, seed=req.seed, stop=req.stop_strings(),
            stop_token_ids=tuple(sorted(stop_token_ids)), ignore_eos=req.ignore_eos, max_tokens=max_tokens,
            logprobs=logprobs, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty)
    except ValueError as e:
        raise bad_request(str(e)) from None


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")
