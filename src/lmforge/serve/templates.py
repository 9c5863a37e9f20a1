"""The server's chat-template renders, each in a worker process bounded in time and memory.

A chat template is code from a model file. The bounded sandbox (``tokenizer/chat.py``)
refuses the single operations that run away, but a template can still loop (a 1e8-iteration
loop froze ``/health`` for 3.97 s when it rendered on the event loop) or accumulate memory
over many steps, and a thread running it can be neither stopped nor limited. So the server
renders in worker processes (``python -m lmforge.serve.template_worker``): each holds the
compiled template, runs under an address-space limit (``memory_mb`` above what it needs at
start: a larger allocation is a MemoryError there, not the server's), and a render that
takes longer than ``timeout`` seconds has its worker killed (a new one starts for the next
render). Both end as a 400 for that request; the server's own threads only wait on a pipe,
so ``/health`` keeps answering meanwhile. A render costs a pipe round trip (measured in
RELIABILITY.md) on top of the render itself.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import LmforgeError


class TemplateError(LmforgeError):
    """A render failed, timed out or ran out of memory: HTTP 400."""


class _Worker:
    def __init__(self, template, memory_mb: int, max_chars: int) -> None:
        import lmforge

        src = str(Path(lmforge.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge.serve.template_worker", str(memory_mb), str(max_chars)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        self.send({"source": template.source, "special_tokens": template.special_tokens})

    def send(self, obj: Any) -> None:
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next reply, or None if none came within ``timeout`` seconds (or the worker died)."""
        out = self.proc.stdout
        ready, _, _ = select.select([out], [], [], max(0.0, timeout))
        if not ready:
            return None
        line = out.readline()
        return json.loads(line) if line else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class TemplateRenderer:
    """``render(messages, add_generation_prompt)`` of a :class:`ChatTemplate`, in up to
    ``workers`` worker processes (started on first use), each render within ``timeout``
    seconds and ``memory_mb`` of memory, its output within ``max_chars`` characters."""

    def __init__(self, template, *, timeout: float = 2.0, memory_mb: int = 512, max_chars: int = 1 << 24,
                 workers: int = 2) -> None:
        self.template = template
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_chars = max_chars
        self._slots: queue.LifoQueue[_Worker | None] = queue.LifoQueue()  # a warm worker first
        for _ in range(workers):
            self._slots.put(None)
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self.stats = {"renders": 0, "timeouts": 0, "restarts": 0}

    def _start(self) -> _Worker:
        w = _Worker(self.template, self.memory_mb, self.max_chars)
        hello = w.receive(30.0)  # the worker compiles the template and says so
        if hello is None or "error" in hello:
            w.kill()
            why = hello["error"] if hello else "the template worker did not start"
            raise TemplateError(why)
        with self._lock:
            self._all.add(w)
        return w

    def _drop(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._all.discard(w)
        self.stats["restarts"] += 1

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The rendered prompt; :class:`TemplateError` (one clear line) for any failure."""
        w = self._slots.get()
        try:
            if w is None or w.proc.poll() is not None:
                w = self._start()
            t0 = time.monotonic()
            try:
                w.send({"messages": messages, "add_generation_prompt": add_generation_prompt})
            except (BrokenPipeError, OSError):
                self._drop(w)
                w = None
                raise TemplateError("the chat template worker stopped; retry") from None
            reply = w.receive(self.timeout)
            self.stats["renders"] += 1
            if reply is None:
                died = w.proc.poll() is not None
                self._drop(w)
                w = None
                if died:
                    raise TemplateError(f"the chat template was stopped: it needed more than {self.memory_mb} MB "
                                        "of memory") from None
                self.stats["timeouts"] += 1
                raise TemplateError(f"the chat template took longer than {self.timeout:g} s to render "
                                    f"(stopped after {time.monotonic() - t0:.1f} s)")
            if "error" in reply:
                raise TemplateError(reply["error"])
            return reply["text"]
        finally:
            self._slots.put(w)

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for w in workers:
            w.kill()
