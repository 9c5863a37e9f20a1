"""uvicorn's HTTP/1.1 protocol with the bounds a public server needs before any request exists.

uvicorn (0.55, h11) bounds a request head's size (``h11_max_incomplete_event_size``) and
the idle time between keep-alive requests (``timeout_keep_alive``), but not the time a
client may take to send its head, and its ``limit_concurrency`` counts every open
connection: 520 connections that each sent half a request head and waited (slowloris)
locked every client out with 503 for as long as they were held. This subclass adds:

- a **head deadline**: a connection has ``header_timeout`` seconds from its first byte (or
  from the end of its previous response) to complete a request head, however it trickles
  the bytes; past it, it gets a 408 (if it sent anything) and is closed;
- a cap on **connections without a complete request head** (``max_pending``): beyond it
  the oldest such connection is closed to make room, so a flood of idle or slow
  connections cannot keep a client that sends a whole request from being read (a real
  client completes its head within milliseconds of connecting);
- OpenAI-shaped JSON for the errors uvicorn answers itself (400 for a malformed request,
  431 for a head over uvicorn's size bound, 408), instead of plain text.

Requests in flight are capped by the guard middleware (``max_concurrent``), not here, so
unauthenticated idle connections never count against clients with real requests.
hypercorn and granian were considered: hypercorn's h11 path has no head deadline either,
and granian runs the app in its own worker processes (no in-process background server for
tests and notebooks); about 80 lines on uvicorn's protocol were the smaller change.
"""

from __future__ import annotations

import http

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_bytes, error_type

_MESSAGES = {
    400: ("the request is not valid HTTP/1.1", "bad_request"),
    408: ("the request head did not arrive in time", "header_timeout"),
    431: ("the request head is too large", "headers_too_large"),
}


def guarded_protocol(header_timeout: float = 10.0, max_pending: int = 256) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these bounds."""

    class GuardedH11Protocol(_Guarded):
        pass

    GuardedH11Protocol.header_timeout = header_timeout
    GuardedH11Protocol.max_pending = max_pending
    return GuardedH11Protocol


class _Guarded(H11Protocol):
    header_timeout = 10.0
    max_pending = 256

    def _pending(self) -> dict:
        """Connections of this server waiting for a request head, oldest first (shared)."""
        reg = getattr(self.server_state, "lmforge_pending", None)
        if reg is None:
            reg = self.server_state.lmforge_pending = {}
        return reg

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._error_status = 400
        next_event = self.conn.next_event

        def next_event_noting_status():
            try:
                return next_event()
            except h11.RemoteProtocolError as e:
                self._error_status = e.error_status_hint
                raise

        self.conn.next_event = next_event_noting_status
        self._await_head()

    def _await_head(self) -> None:
        pending = self._pending()
        while len(pending) >= self.max_pending:
            oldest = next(iter(pending))
            pending.pop(oldest)
            oldest._close_waiting()
        pending[self] = None
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _head_done(self) -> None:
        self._pending().pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _close_waiting(self) -> None:
        """Close a connection that has no request in progress (evicted or timed out)."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        self._pending().pop(self, None)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._send_error(408)  # it sent part of a head: say why it is closed
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request head was complete
            self._head_done()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request (a new cycle)
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self._await_head()

    def connection_lost(self, exc) -> None:
        self._head_done()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # uvicorn's plain-text answer to a bad request
        self._send_error(self._error_status if self._error_status in _MESSAGES else 400)

    def _send_error(self, status: int) -> None:
        """Answer ``status`` as JSON and close (written as bytes: h11 may be in its error state)."""
        message, code = _MESSAGES[status]
        body = error_bytes(message, error_type(status), code)
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self._head_done()
        if not self.transport.is_closing():
            self.transport.write(head.encode() + body)
            self.transport.close()
