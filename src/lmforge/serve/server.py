"""Running the app: uvicorn in the foreground (``lmforge serve``) or on a background thread.

uvicorn runs with its pure-Python h11 protocol, extended in ``connections.py`` (a deadline
for each request head, a cap on connections without one, JSON errors; a request head
larger than ``h11_max_incomplete_event_size`` is refused by the protocol with a JSON 431,
smaller heads over the server's own ``max_header_bytes`` get one from the app), its own
access log off (the app writes JSON access lines), ``X-Forwarded-For`` believed only from
the configured ``trusted_proxies``, and a graceful shutdown: on SIGINT/SIGTERM it stops
accepting connections, lets in-flight responses finish for up to ``drain_timeout``
seconds, then the app's lifespan drains and stops the engine loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

#: uvicorn's own bound on a request head; the app answers heads over its limit with 431 up to here.
H11_MAX_HEAD = 1 << 20


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                   log_level: str = "warning"):
    """uvicorn's settings for ``app``; the connection bounds and trusted proxies come from the
    app's ServeConfig (``app.state.config``) when it has one."""
    import uvicorn

    from .connections import guarded_protocol

    cfg = getattr(getattr(app, "state", None), "config", None)
    proxies = list(getattr(cfg, "trusted_proxies", []) or [])
    protocol = guarded_protocol(getattr(cfg, "header_timeout", 10.0), getattr(cfg, "max_pending_connections", 256))
    return uvicorn.Config(
        app, host=host, port=port, http=protocol, ws="none", lifespan="on", log_config=None, access_log=False,
        log_level=log_level, h11_max_incomplete_event_size=H11_MAX_HEAD, timeout_keep_alive=5,
        timeout_graceful_shutdown=drain_timeout, limit_concurrency=None, server_header=False,
        proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
    )


def run_server(app, **kwargs) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (then drain and return)."""
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):
            # uvicorn re-raises a captured SIGINT after its graceful shutdown; that lands in the
            # event loop while the lifespan task still waits and logs a CancelledError traceback.
            # Forget the captured signals instead: run() returns and the command exits cleanly.
            @contextlib.contextmanager
            def captured():
                with super(Server, self).capture_signals():
                    try:
                        yield
                    finally:
                        self._captured_signals.clear()

            return captured()

    Server(uvicorn_config(app, **kwargs)).run()


class BackgroundServer:
    """The app served on a loopback port from a background thread (tests, benchmarks, notebooks).

    ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``; leaving the block
    shuts the server down gracefully (in-flight requests drain first)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 10.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, host=self.host, port=self.port, drain_timeout=drain_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="lmforge-uvicorn")

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
