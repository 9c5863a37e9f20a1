"""Every exception a route can raise, answered as an OpenAI-style JSON error.

:func:`install_handlers` registers them on the app: the routes' own :class:`ApiError`;
the library's errors through :func:`engine_error` (the one mapping, also used for errors
that arrive as engine events: overloaded 503, model fault 503, timeout 504, anything
else the user's 400); FastAPI's validation errors (422) as 400 with the field named;
404 / 405; and a bug as a logged 500 without its traceback in the body.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LmforgeError
from .errors import ApiError, echo, error_response, error_type
from .logs import LOGGER
from .scheduler import ModelFault, Overloaded, TimedOut

log = logging.getLogger(LOGGER)

_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "content": "a string, a list of content parts ({'type': 'text', 'text': ...}), or null",
    "stop": "a string or a list of strings",
}


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part or part in (
        "TextPart", "OtherPart"
    )


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for pydantic's first error: the field by its dotted path, unions by what they accept."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
    if e.get("type") == "model_attributes_type" or (not loc and e.get("type") in ("dict_type", "model_type")):
        return "the request body must be a JSON object", None
    if e.get("type") == "missing" and not loc:
        return "the request body is missing", None
    clean = [p for p in loc if not _is_union_tag(p)]
    field = ".".join(clean)
    if clean != loc:  # a union: every alternative failed; say what the field may be
        hint = _UNION_HINTS.get(clean[-1] if clean else "", "")
        if hint:
            return f"{field}: expected {hint}", field or None
        loc = clean
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{field}: {e.get('msg', 'invalid value')}{more}", field or None


def engine_error(err: BaseException, timeout: float) -> ApiError:
    """The API error for an error of the library or the engine (``timeout``: the request's limit, s)."""
    if isinstance(err, TimedOut):
        return ApiError(504, f"the request took longer than {timeout:g} s", "timeout_error", "timeout")
    if isinstance(err, Overloaded):
        return ApiError(503, str(err), "server_overloaded", "overloaded", headers={"Retry-After": "1"})
    if isinstance(err, ModelFault):
        return ApiError(503, str(err), "server_error", "model_output_invalid")
    if isinstance(err, LmforgeError):
        return ApiError(400, str(err), code="invalid_request")
    return ApiError(500, "internal server error", "server_error", "internal_error")


def api_error_response(exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)


def install_handlers(app: FastAPI, timeout: float) -> None:
    """Register the handlers on ``app`` (``timeout``: the server's request limit, for 504 messages)."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        ctype = request.headers.get("content-type", "")
        if message == "the request body must be a JSON object" and ctype and "json" not in ctype.lower():
            message = f"send the request body as JSON with 'Content-Type: application/json' (got {ctype!r})"
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return api_error_response(exc)

    @app.exception_handler(LmforgeError)
    async def on_library_error(request: Request, exc: LmforgeError):
        return api_error_response(engine_error(exc, timeout))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        type_ = error_type(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {echo(request.url.path)}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {echo(request.url.path)}"
        return error_response(exc.status_code, message, type_, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.error("unhandled error", exc_info=exc,
                  extra={"fields": {"request_id": request.scope.get("state", {}).get("request_id")}})
        return error_response(500, "internal server error", "server_error", "internal_error")
