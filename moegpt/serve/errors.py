"""OpenAI-style errors: every failure the server reports is one JSON body of the shape OpenAI's API
uses, ``{"error": {"message", "type", "param", "code"}}``, with a one-line message."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """Raised by the routes; the app turns it into a JSON error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, _one_line(message), param=param)


def error_body(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": _one_line(message), "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status,
                        headers=e.headers)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())
