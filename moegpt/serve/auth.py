"""``--api-key``: every ``/v1/*`` request must carry ``Authorization: Bearer KEY`` (as vLLM's flag).

An ASGI middleware, so unknown ``/v1`` routes are refused too and the routes never see an
unauthenticated request; ``/health`` and ``/metrics`` stay open for probes and scrapers. The key is
compared in constant time. A refusal is a 401 with OpenAI's body for a bad key.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from moegpt.serve.errors import error_body

PROTECTED_PREFIX = "/v1"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (the scheme is case-insensitive)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class RequireAPIKey:
    """ASGI middleware: 401 for a ``/v1`` request without the right bearer token."""

    def __init__(self, app, api_key: str):
        if not api_key:
            raise ValueError("the API key must be non-empty")
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _protected(scope["path"]):
            token = bearer_token(scope.get("headers", []))
            # compare_digest: the time taken says nothing about how much of a guess was right.
            if token is None or not hmac.compare_digest(token, self.key):
                message = ("no API key given: send 'Authorization: Bearer KEY'" if token is None
                           else "incorrect API key provided")
                response = JSONResponse(error_body(401, message, code="invalid_api_key"), 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
