"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``.

Every layer answers through these: the routes (:class:`ApiError`), the guard middleware and
the HTTP protocol itself (:func:`error_bytes`, for a request uvicorn refuses before the app
sees it), so a client never gets a plain-text or HTML error body.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
                503: "server_overloaded", 504: "timeout_error"}

#: Characters of a client-given value (a model name, a route) echoed back in an error.
ECHO_CHARS = 64


def echo(value: str) -> str:
    """A client-given string as an error message may quote it: at most :data:`ECHO_CHARS`."""
    return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + f"... ({len(value)} characters)"


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_type(status: int) -> str:
    return STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def error_bytes(message: str, type_: str, code: str | None = None) -> bytes:
    """The JSON body of an error, for layers below the app (ASGI middleware, the protocol)."""
    return json.dumps(error_body(message, type_, code)).encode()
