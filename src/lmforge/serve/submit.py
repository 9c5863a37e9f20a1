"""Submitting decoded requests to the scheduler and waiting for them, whole or streamed.

The engine stops a request's computation at its deadline (between two prompt chunks or decode
steps) whether or not the handler is still there to answer 504, and a request whose client
leaves is aborted at once (its batch rows freed): :func:`collect` watches the connection while
it waits; a stream aborts when its generator is closed or cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import LmforgeError
from ..infer.sampling import SamplingParams
from .errors import ApiError, error_body
from .handlers import engine_error
from .logs import LOGGER
from .scheduler import Event, ModelFault, Overloaded
from .state import ServedModel, ServerState
from .wire import DONE, STREAM_HEADERS, sse

log = logging.getLogger(LOGGER)


def submit(st: ServerState, m: ServedModel, prompts: list[list[int]],
           params: list[SamplingParams]) -> tuple[asyncio.Queue, list[str]]:
    """Queue the sequences; return (their event queue, their request ids) for the caller to consume."""
    q: asyncio.Queue[Event] = asyncio.Queue()
    rids = st.scheduler.submit(m.name, prompts, params, asyncio.get_running_loop(), q,
                               timeout=st.config.request_timeout)
    return q, rids


async def collect(st: ServerState, request: Request, q: asyncio.Queue, rids: list[str], count: int) -> list[Any]:
    """Wait for ``count`` sequences to finish (their completions, in order); abort them with
    499 if the client leaves or 504 when time runs out; an engine error as its API error."""
    timeout = st.config.request_timeout
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout

    async def gather():
        while len(results) < count:
            ev = await q.get()
            if ev.kind == "done":
                results[ev.index] = ev.completion
            elif ev.kind == "error":
                raise ev.error

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            try:
                work.result()  # raises the engine's error, if any
            except (LmforgeError, RuntimeError) as e:
                raise engine_error(e, timeout) from None
            return [results[i] for i in range(count)]
        st.scheduler.abort(rids)
        if watch in done:
            raise ApiError(499, "the client closed the connection", code="client_closed")
        raise ApiError(504, f"the request took longer than {timeout:g} s", "timeout_error", "timeout")
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()


async def stream_events(st: ServerState, q: asyncio.Queue, rids: list[str], count: int,
                        on_event: Callable[[Event], Iterable[dict]],
                        finish: Callable[[], Iterable[dict]]) -> AsyncIterator[str]:
    """SSE lines: ``on_event``'s chunks for each event of the ``count`` sequences, then ``finish``'s
    and ``[DONE]``; an error or the deadline ends the stream with an error event; all are aborted
    if the client goes away."""
    timeout = st.config.request_timeout
    deadline = time.monotonic() + timeout
    left = count
    try:
        while left:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                st.scheduler.abort(rids)
                left = 0
                yield sse(error_body(f"the request took longer than {timeout:g} s", "timeout_error", "timeout"))
                yield DONE
                return
            if ev.kind == "error":
                st.scheduler.abort(rids)
                left = 0
                err = engine_error(ev.error, timeout)
                if err.status >= 500 and not isinstance(ev.error, (Overloaded, ModelFault)):
                    log.error("generation failed", exc_info=ev.error)
                yield sse(error_body(err.message, err.type, err.code))
                yield DONE
                return
            for chunk in on_event(ev):
                yield sse(chunk)
            if ev.kind == "done":
                left -= 1
        for chunk in finish():
            yield sse(chunk)
        yield DONE
    finally:
        if left:  # the client went away (the generator was closed or cancelled)
            st.scheduler.abort(rids)


def stream_response(st: ServerState, q: asyncio.Queue, rids: list[str], count: int, head: list[dict],
                    on_event: Callable[[Event], Iterable[dict]], finish: Callable[[], Iterable[dict]],
                    on_end: Callable[[], None]) -> StreamingResponse:
    """The server-sent-event response: the ``head`` chunks, the events, then ``on_end()`` (its log
    line); the sequences are aborted if the client leaves before the stream began or ended."""

    async def body():
        ended = False
        try:
            for chunk in head:
                yield sse(chunk)
            async for line in stream_events(st, q, rids, count, on_event, finish):
                yield line
            ended = True
            on_end()
        finally:
            if not ended:
                st.scheduler.abort(rids)

    return StreamingResponse(body(), media_type="text/event-stream", headers=STREAM_HEADERS)
