"""The server's engine loop: one thread drives every model's :class:`InferenceEngine`.

Request handlers (asyncio, the server's event loop) never touch an engine. They
:meth:`Scheduler.submit` token ids and sampling settings; the command goes into a
thread-safe queue, and the loop thread adds it to its engine before the next
``engine.step()``. Each step admits waiting requests into free batch rows and decodes one
token for every running sequence of that engine (continuous batching: a request joins
and leaves the batch between any two steps). What each request gained is handed back
to the handler's event loop through ``loop.call_soon_threadsafe`` into the request's own
``asyncio.Queue``, as :class:`Event` objects: a ``"delta"`` per step, then ``"done"`` with
the engine's :class:`~lmforge.infer.engine.Completion`, or ``"error"``.

A handler whose client went away (or whose time ran out) calls :meth:`Scheduler.abort`:
the loop aborts the request before its next step, which frees the batch row at once. A
request's deadline also goes to the engine, which stops it between two prompt chunks or
decode steps (a step is bounded by the engine's chunked prefill), so the computation ends
with the deadline whether or not the handler is still there.

Readiness (``GET /ready``): the loop stamps :attr:`Scheduler.heartbeat` every time round
(at least every 0.5 s, and four times per ``stall_timeout``, when idle); a loop that has not come round for ``stall_timeout``
seconds is stalled, and a model that produced NaN or infinite logits is marked faulty
(its requests fail with 503) until the server restarts.

With several models (a base and its LoRA adapters, one engine each), the one loop steps
every engine that has work in turn. Metrics (running/waiting gauges, token counters,
time to first token, inter-token and end-to-end latency, decode batch sizes) are
recorded here, where the timings are known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import LmforgeError
from ..infer.engine import NonFiniteOutput

if TYPE_CHECKING:
    from ..infer.engine import Completion, InferenceEngine, StreamDelta
    from ..infer.sampling import SamplingParams
    from .metrics import ServerMetrics

log = logging.getLogger("lmforge.serve")


class Overloaded(LmforgeError):
    """Too many requests are waiting (or the server is shutting down): HTTP 503."""


class TimedOut(LmforgeError):
    """A request ran past its deadline; the loop aborted it."""


class ModelFault(LmforgeError):
    """The model produced non-finite outputs: HTTP 503 until the server is restarted."""


@dataclasses.dataclass
class Event:
    """One message from the engine loop to a request handler."""

    kind: str  # "delta", "done" or "error"
    index: int  # which of the handler's sequences (choice index)
    delta: StreamDelta | None = None
    completion: Completion | None = None
    error: BaseException | None = None


@dataclasses.dataclass
class _Active:
    rid: str
    model: str
    index: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    deadline: float = float("inf")  # perf_counter time after which the loop aborts it
    last_token_at: float | None = None
    tokens: int = 0


def _put_all(items: list) -> None:
    for q, event in items:
        q.put_nowait(event)


class Scheduler:
    """One engine loop thread for all served models (see the module docstring)."""

    def __init__(
        self,
        engines: dict[str, InferenceEngine],
        metrics: ServerMetrics | None = None,
        *,
        max_waiting: int = 256,
        stall_timeout: float = 30.0,
    ) -> None:
        if not engines:
            raise LmforgeError("the scheduler needs at least one engine")
        self.engines = dict(engines)
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._active: dict[str, _Active] = {}  # touched by the loop thread only
        self._pending = 0  # submitted, not yet added to an engine (guarded by _lock)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.accepting = True
        self._batch: dict[asyncio.AbstractEventLoop, list] | None = None
        import torch

        # OpenMP thread counts are per thread: the loop thread takes the setting of the
        # thread that builds the scheduler (the app factory's), not of the one starting it
        self._threads = torch.get_num_threads()
        self.stats = {"steps": 0, "max_decode_rows": 0, "multi_row_steps": 0, "aborted": 0, "errors": 0}
        self.stall_timeout = stall_timeout
        self.heartbeat = time.monotonic()  # the loop's last time round
        self.faults: dict[str, str] = {}  # model -> why it cannot serve (non-finite outputs)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submitted(self) -> int:
        """Sequences handed to the engine loop, not yet queued by an engine."""
        with self._lock:
            return self._pending

    def in_flight(self) -> int:
        return self.submitted() + sum(e.num_running + len(e.waiting) for e in self.engines.values())

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): the loop runs and comes round, and no model is faulty."""
        if not self.alive:
            return False, "the engine loop is not running"
        if not self.accepting:
            return False, "the server is shutting down"
        stalled = time.monotonic() - self.heartbeat
        if stalled > self.stall_timeout:
            return False, f"the engine loop has not come round for {stalled:.1f} s"
        if self.faults:
            name, why = next(iter(self.faults.items()))
            return False, f"model {name}: {why}"
        return True, ""

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to ``drain_timeout`` s), then
        abort what is left and end the loop thread."""
        self.accepting = False
        deadline = time.monotonic() + max(0.0, drain_timeout)
        while self.alive and self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.in_flight()
        if left:
            log.warning("shutdown: aborting unfinished requests", extra={"fields": {"requests": left}})
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None

    # ---- called from request handlers (any thread / event loop) -----------------------------
    def new_id(self) -> str:
        return f"r{next(self._ids)}"

    def waiting_count(self, model: str | None = None) -> int:
        engines = [self.engines[model]] if model else list(self.engines.values())
        return self.submitted() + sum(len(e.waiting) for e in engines)

    def submit(
        self,
        model: str,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        loop: asyncio.AbstractEventLoop,
        out: asyncio.Queue,
        timeout: float | None = None,
    ) -> list[str]:
        """Queue one sequence per (prompt ids, params); their events go to ``out`` with the
        sequence's position as ``index``. Returns the request ids (for :meth:`abort`).
        After ``timeout`` seconds the loop aborts them itself and sends a ``TimedOut`` error,
        whether or not the handler is still there to see it."""
        if model not in self.engines:
            raise LmforgeError(f"unknown model {model!r}")
        if model in self.faults:
            raise ModelFault(f"model {model} cannot serve: {self.faults[model]}")
        if not self.accepting:
            raise Overloaded("the server is shutting down")
        if not self.alive:
            raise Overloaded("the engine loop is not running")
        if self.waiting_count() + len(prompts) > self.max_waiting:
            raise Overloaded(f"too many requests are waiting (limit {self.max_waiting}); retry shortly")
        rids = [self.new_id() for _ in prompts]
        now = time.perf_counter()
        deadline = now + timeout if timeout is not None else float("inf")
        with self._lock:
            self._pending += len(rids)
        for i, (rid, ids, p) in enumerate(zip(rids, prompts, params)):
            self._commands.put(("add", _Active(rid, model, i, loop, out, now, deadline), list(ids), p))
        self._wake.set()
        return rids

    def abort(self, rids: Sequence[str]) -> None:
        """Cancel requests (client gone, timed out); their batch rows free before the next step."""
        for rid in rids:
            self._commands.put(("abort", rid))
        self._wake.set()

    # ---- the loop thread -------------------------------------------------------------------
    def _deliver(self, a: _Active, event: Event) -> None:
        if self._batch is not None:  # within a step: sent together after it (one wake-up per loop)
            self._batch.setdefault(a.loop, []).append((a.queue, event))
            return
        try:
            a.loop.call_soon_threadsafe(a.queue.put_nowait, event)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening
            pass

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        for loop, items in (batch or {}).items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, a, ids, params = cmd
                with self._lock:
                    self._pending -= 1
                engine = self.engines[a.model]
                try:
                    engine.add_request(ids, params, request_id=a.rid,
                                       deadline=a.deadline if a.deadline != float("inf") else None)
                except LmforgeError as e:
                    self._deliver(a, Event("error", a.index, error=e))
                    continue
                self._active[a.rid] = a
            else:
                rid = cmd[1]
                a = self._active.pop(rid, None)
                if a is None:
                    continue
                self._abort(a.model, rid)

    def _abort(self, model: str, rid: str) -> None:
        """Stop request ``rid`` in its engine (frees its batch row) and count it."""
        engine = self.engines[model]
        if engine.abort(rid):
            engine.finished.pop(rid, None)
            self.stats["aborted"] += 1
            if self.metrics:
                self.metrics.aborted.labels(model).inc()

    def _expire(self) -> None:
        now = time.perf_counter()
        for rid, a in [(r, a) for r, a in self._active.items() if a.deadline < now]:
            del self._active[rid]
            self._abort(a.model, rid)
            self._deliver(a, Event("error", a.index, error=TimedOut("the request ran out of time")))

    def _observe_step(self, model: str, rows: int) -> None:
        self.stats["steps"] += 1
        if rows > self.stats["max_decode_rows"]:
            self.stats["max_decode_rows"] = rows
        if rows > 1:
            self.stats["multi_row_steps"] += 1
        if self.metrics and rows:
            self.metrics.decode_batch.labels(model).observe(rows)

    def _dispatch(self, model: str, engine: InferenceEngine, deltas: list[StreamDelta]) -> None:
        m = self.metrics
        now = time.perf_counter()
        for d in deltas:
            a = self._active.get(d.request_id)
            if a is None:  # aborted in this very step: nobody waits for it
                engine.finished.pop(d.request_id, None)
                continue
            n = len(d.token_ids)
            if m:
                if a.last_token_at is None:
                    m.ttft.labels(model).observe(now - a.submitted)
                else:
                    m.itl.labels(model).observe(now - a.last_token_at)
                m.generation_tokens.labels(model).inc(n)
            if d.finish_reason == "timeout":  # the engine stopped it at its deadline
                del self._active[d.request_id]
                engine.finished.pop(d.request_id, None)
                self.stats["aborted"] += 1
                if m:
                    m.aborted.labels(model).inc()
                self._deliver(a, Event("error", a.index, error=TimedOut("the request ran out of time")))
                continue
            a.last_token_at = now
            a.tokens += n
            self._deliver(a, Event("delta", a.index, delta=d))
            if d.finish_reason is not None:
                del self._active[d.request_id]
                c = engine.pop_completion(d.request_id)
                if m:
                    m.prompt_tokens.labels(model).inc(len(c.prompt_ids))
                    m.e2e.labels(model).observe(now - a.submitted)
                    m.finished.labels(model, c.finish_reason).inc()
                self._deliver(a, Event("done", a.index, completion=c))

    def _fail_engine(self, model: str, engine: InferenceEngine, err: BaseException) -> None:
        """A step raised (a bug, out of memory, a broken model): fail that engine's requests,
        keep serving; a model that produced non-finite logits is marked faulty (not ready)."""
        if isinstance(err, NonFiniteOutput):
            self.faults[model] = str(err)
            err = ModelFault(f"model {model} cannot serve: {err}")
            log.error("model produced non-finite logits", extra={"fields": {"model": model}})
        else:
            log.exception("engine step failed", extra={"fields": {"model": model}})
        self.stats["errors"] += 1
        for rid, a in list(self._active.items()):
            if a.model != model:
                continue
            del self._active[rid]
            try:
                engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine is already in a bad state
                pass
            engine.finished.pop(rid, None)
            self._deliver(a, Event("error", a.index, error=err))

    def _run(self) -> None:
        import torch

        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._handle_commands()
                self._expire()
                busy = [(name, e) for name, e in self.engines.items() if e.has_unfinished()]
                if not busy:  # idle: wake often enough that the heartbeat shows a live loop
                    self._wake.wait(min(0.5, self.stall_timeout / 4))
                    self._wake.clear()
                    continue
                for name, engine in busy:
                    rows = len(engine.running)  # rows decoded this step (the prefilling ones are not)
                    try:
                        deltas = engine.step()
                    except Exception as e:  # noqa: BLE001 - reported to the requests, loop survives
                        self._fail_engine(name, engine, e)
                        continue
                    self._observe_step(name, rows)
                    self._batch = {}
                    try:
                        self._dispatch(name, engine, deltas)
                    finally:
                        self._flush()
            # stopped: abort whatever is left so handlers end
            for rid, a in list(self._active.items()):
                engine = self.engines[a.model]
                engine.abort(rid)
                engine.finished.pop(rid, None)
                self._deliver(a, Event("error", a.index, error=Overloaded("the server shut down")))
            self._active.clear()

    # ---- introspection ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            name: {"running": len(e.running), "prefilling": len(e.prefilling), "waiting": len(e.waiting),
                   "max_batch_size": e.max_batch_size}
            for name, e in self.engines.items()
        }
