"""The OpenAI-compatible HTTP server: ``create_app(models, config)`` -> a FastAPI app.

Routes (``serve/routes/``): ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed
as server-sent events, or whole), ``GET /v1/models``, ``POST /tokenize`` and ``/detokenize``,
``GET /health``, ``/ready``, ``/metrics`` (Prometheus) and the web chat page at ``/``.

Every request passes one ASGI middleware (:class:`~lmforge.serve.guard.Guard`) before
any route: request ids, header/body limits and timeouts, API keys (on every path that
``serve/access.py`` does not declare public), failed-login throttling, rate limits, status
metrics and access logs. Every error, whichever layer raises it (the routes, see
``serve/handlers.py``; the guard; or uvicorn's HTTP protocol, see ``serve/connections.py``),
leaves as an OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}``.

Chat templates render in a worker thread under a time and size budget
(:class:`~lmforge.serve.templates.TemplateRenderer`), never on the event loop.
Generation goes through :class:`~lmforge.serve.scheduler.Scheduler`: one engine loop
thread, continuous batching across concurrent requests, a request aborted (its batch
row freed) as soon as its client disconnects or its time runs out.

What the routes share lives in one :class:`~lmforge.serve.state.ServerState` on
``app.state.server``; ``ServeConfig`` and ``ServedModel`` are defined in ``serve/state.py``
and importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from .access import PUBLIC_PATHS, document_auth
from .guard import Guard
from .handlers import install_handlers
from .logs import LOGGER
from .routes import include_routes, route_paths
from .scheduler import Scheduler
from .state import ServeConfig, ServedModel, ServerState

__all__ = ["ServeConfig", "ServedModel", "ServerState", "create_app"]

log = logging.getLogger(LOGGER)


def create_app(models: Sequence[ServedModel], config: ServeConfig | None = None,
               scheduler: Scheduler | None = None) -> FastAPI:
    """The FastAPI app over ``models`` (the first is the base, the default model name)."""
    config = config or ServeConfig()
    st = ServerState.build(models, config, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st.scheduler.start()
        log.info("serving", extra={"fields": {"event": "start", "models": list(st.models),
                                             "auth": config.api_keys.enabled}})
        try:
            yield
        finally:
            await asyncio.to_thread(st.scheduler.stop, config.drain_timeout)
            st.close()
            log.info("stopped", extra={"fields": {"event": "stop"}})

    app = FastAPI(
        title="lmforge",
        version=_version(),
        description="OpenAI-compatible completions and chat over lmforge checkpoints.",
        lifespan=lifespan,
    )
    app.state.server = st
    app.state.scheduler = st.scheduler
    app.state.metrics = st.metrics
    app.state.config = config
    app.state.models = st.models
    install_handlers(app, config.request_timeout)
    include_routes(app)
    document_auth(app)

    # ---- middleware (the guard innermost of the two, CORS outermost when enabled) -------------
    app.add_middleware(Guard, config=config, metrics=st.metrics, known_paths=PUBLIC_PATHS | route_paths())
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    return app


def _version() -> str:
    from .. import __version__

    return __version__
