"""The guard: one ASGI middleware every HTTP request passes before any route.

In order: a request id (``X-Request-Id``, the client's when it sends a sane one); a cap
on requests in flight (503; probes exempt); the header limit (431); the failed-login
throttle (429 before the key is even compared, once a client address has failed
``auth_fail_limit`` times a minute); the API key on protected routes (401); the caller's
rate limit (429 with ``Retry-After``); the body, read here within ``max_body_bytes`` (413,
counted as it arrives, so a chunked body cannot slip past) and within ``body_timeout``
seconds (408, so a client that trickles a body cannot hold a request open). Then the
response status is counted and one JSON access line written.

The client address is the socket's peer, or, only for connections from ``--trusted-proxies``,
the one the proxy names in ``X-Forwarded-For`` (uvicorn's proxy-headers middleware, enabled
for exactly those addresses): a rotating ``X-Forwarded-For`` from anywhere else changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .access import PROBES, public_paths
from .auth import RateLimiter, bearer_token
from .errors import error_bytes
from .logs import LOGGER

if TYPE_CHECKING:
    from .metrics import ServerMetrics
    from .state import ServeConfig

log = logging.getLogger(LOGGER)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Guard:
    """Request ids, limits, API keys, throttles, status metrics, access logs (module docstring)."""

    def __init__(self, app, config: ServeConfig, metrics: ServerMetrics, known_paths: Iterable[str]) -> None:
        """``known_paths``: the app's routes, the metrics' path labels (any other path is "other")."""
        self.app = app
        self.config = config
        self.metrics = metrics
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        # failed logins: auth_fail_limit a minute per client address, as many at once
        self.auth_throttle = RateLimiter(config.auth_fail_limit, config.auth_fail_limit or None)
        self.public = public_paths(config)  # serve/access.py: the one declaration of what needs no key
        self.known = frozenset(known_paths)
        self.active = 0  # requests in flight (this event loop only: no lock needed)

    async def _reply(self, send, status: int, message: str, type_: str, code: str, rid: str,
                     headers: dict[str, str] | None = None) -> None:
        body = error_bytes(message, type_, code)
        h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
             (b"x-request-id", rid.encode())]
        h += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": h})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = scope.get("headers") or []
        given = next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), None)
        rid = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        status_box = {"status": 500}

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        self.active += 1
        try:
            await self._handle(scope, receive, send_wrapped, send, rid, path, method, headers, status_box)
        finally:
            self.active -= 1
            status = status_box["status"]
            label = path if path in self.known else "other"
            dt = time.perf_counter() - t0
            self.metrics.http.labels(method, label, str(status)).inc()
            self.metrics.http_latency.labels(label).observe(dt)
            if path not in ("/metrics", *PROBES):
                client = scope.get("client")
                log.info("request", extra={"fields": {
                    "event": "http", "request_id": rid, "method": method, "path": label, "status": status,
                    "duration_ms": round(dt * 1000, 2), "client": client[0] if client else None,
                    "key": scope["state"].get("api_key"),
                }})

    async def _handle(self, scope, receive, send, raw_send, rid, path, method, headers, status_box) -> None:
        cfg = self.config

        async def refuse(status: int, message: str, type_: str, code: str, extra: dict[str, str] | None = None):
            status_box["status"] = status
            await self._reply(raw_send, status, message, type_, code, rid, extra)

        if self.active > cfg.max_concurrent and path not in PROBES:
            return await refuse(503, f"the server is handling {cfg.max_concurrent} requests; retry shortly",
                                "server_overloaded", "overloaded", {"Retry-After": "1"})
        header_bytes = sum(len(k) + len(v) + 4 for k, v in headers)
        if header_bytes > cfg.max_header_bytes:
            return await refuse(431, f"the request headers hold {header_bytes} bytes; the limit is "
                                f"{cfg.max_header_bytes}", "invalid_request_error", "headers_too_large")
        protected = path not in self.public and not (method == "OPTIONS" and cfg.cors_origins)
        client = scope.get("client")
        address = f"ip:{client[0] if client else '?'}"
        caller = None
        if protected and cfg.api_keys.enabled:
            if self.auth_throttle.enabled:
                wait = self.auth_throttle.wait(address)
                if wait > 0:  # refused before the key is compared: guessing gains nothing
                    self.metrics.auth_throttled.inc()
                    return await refuse(429, f"too many failed API-key attempts from this address; retry in "
                                        f"{math.ceil(wait)} s", "rate_limit_error", "auth_throttled",
                                        {"Retry-After": str(max(1, math.ceil(wait)))})
            auth = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
            token = bearer_token(auth)
            caller = cfg.api_keys.check(token)
            if caller is None:
                if self.auth_throttle.enabled:
                    self.auth_throttle.acquire(address)
                msg = "missing API key: send it as 'Authorization: Bearer KEY'" if token is None else "invalid API key"
                return await refuse(401, msg, "authentication_error",
                                    "missing_api_key" if token is None else "invalid_api_key",
                                    {"WWW-Authenticate": "Bearer"})
            scope["state"]["api_key"] = caller
        if protected and self.limiter.enabled:
            wait = self.limiter.acquire(caller or address)
            if wait > 0:
                self.metrics.rate_limited.inc()
                return await refuse(429, f"rate limit exceeded; retry in {math.ceil(wait)} s", "rate_limit_error",
                                    "rate_limit_exceeded", {"Retry-After": str(max(1, math.ceil(wait)))})
        if method not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await refuse(400, "invalid Content-Length header", "invalid_request_error", "bad_request")
            if declared > cfg.max_body_bytes:
                return await refuse(413, f"the request body has {declared} bytes; the limit is {cfg.max_body_bytes}",
                                    "invalid_request_error", "request_too_large")
        chunks, size = [], 0
        deadline = time.monotonic() + cfg.body_timeout
        while True:  # read the body here, bounded in size and time, then replay it to the app
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await refuse(408, f"the request body did not arrive within {cfg.body_timeout:g} s",
                                    "timeout_error", "body_timeout", {"Connection": "close"})
            if message["type"] == "http.disconnect":
                status_box["status"] = 499
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cfg.max_body_bytes:
                return await refuse(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes",
                                    "invalid_request_error", "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
