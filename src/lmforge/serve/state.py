"""What a running server holds: its configuration, the served models and the shared machinery.

:class:`ServerState` is built once by the app factory and hung on ``app.state.server``; routes
reach it through :func:`state_of` (no closure captures it), so each route module is a plain
module of functions over an explicit object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from ..errors import LmforgeError
from .auth import ApiKeys
from .errors import ApiError, echo
from .logs import BodyMasker
from .metrics import ServerMetrics
from .scheduler import Scheduler
from .templates import TemplateError, TemplateRenderer
from .wire import TokenText


@dataclasses.dataclass
class ServeConfig:
    """The server's limits and switches (``lmforge serve --help`` documents each)."""

    api_keys: ApiKeys = dataclasses.field(default_factory=lambda: ApiKeys([]))
    rate_limit: float = 0.0  # requests a minute per key (0: off)
    rate_burst: int | None = None
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10
    max_n: int = 8
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_tokens_cap: int = 4096
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions
    max_messages: int = 512
    max_stop: int = 16
    request_timeout: float = 300.0
    max_waiting: int = 256
    cors_origins: list[str] = dataclasses.field(default_factory=list)
    log_requests: bool = False
    drain_timeout: float = 30.0
    max_concurrent: int = 512  # requests in flight before 503 (probes exempt)
    auth_fail_limit: float = 10.0  # failed API-key attempts a minute per client address (0: off)
    metrics_public: bool = False  # /metrics without a key even when keys are set
    trusted_proxies: list[str] = dataclasses.field(default_factory=list)  # whose X-Forwarded-For is believed
    header_timeout: float = 10.0  # seconds from a connection's first byte to its complete request head
    body_timeout: float = 30.0  # seconds for a whole request body to arrive
    max_pending_connections: int = 256  # connections without a complete request head (oldest closed beyond)
    stall_timeout: float = 30.0  # seconds the engine loop may take to come round before /ready fails
    template_timeout: float = 2.0  # seconds a chat template may take to render
    template_memory_mb: int = 512  # memory a template worker may allocate beyond its start-up size


@dataclasses.dataclass
class ServedModel:
    """One model name the API serves: an engine, its chat template and where it came from."""

    name: str
    engine: Any  # InferenceEngine
    template: Any  # ChatTemplate
    parent: str | None = None  # the base model's name for an adapter
    source: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer


@dataclasses.dataclass
class ServerState:
    """The served models and the machinery every route shares."""

    config: ServeConfig
    models: dict[str, ServedModel]  # by name; the first is the base
    scheduler: Scheduler
    metrics: ServerMetrics
    renderers: dict[int, TemplateRenderer]  # by id(template): adapters share their base model's
    token_text: dict[str, TokenText]  # by model name
    masker: BodyMasker | None  # request bodies logged (PII-masked) with --log-requests

    @classmethod
    def build(cls, models: Sequence[ServedModel], config: ServeConfig, scheduler: Scheduler | None) -> ServerState:
        if not models:
            raise LmforgeError("the server needs at least one model")
        by_name = {m.name: m for m in models}
        if len(by_name) != len(models):
            raise LmforgeError("two served models have the same name")
        metrics = ServerMetrics()
        scheduler = scheduler or Scheduler({m.name: m.engine for m in models}, metrics,
                                           max_waiting=config.max_waiting, stall_timeout=config.stall_timeout)
        scheduler.metrics = metrics
        metrics.attach(scheduler)
        # one renderer (worker processes) per template: adapters share their base model's
        renderers: dict[int, TemplateRenderer] = {}
        for m in models:
            if id(m.template) not in renderers:
                renderers[id(m.template)] = TemplateRenderer(
                    m.template, timeout=config.template_timeout, memory_mb=config.template_memory_mb,
                    max_chars=max(1 << 20, 4 * config.max_body_bytes))
        return cls(config, by_name, scheduler, metrics, renderers, {m.name: TokenText(m.tokenizer) for m in models},
                   BodyMasker() if config.log_requests else None)

    @property
    def base(self) -> ServedModel:
        return next(iter(self.models.values()))

    def model(self, name: str | None) -> ServedModel:
        """The served model a request names (none: the base); 404 for an unknown name."""
        if name is None or name == "":
            return self.base
        m = self.models.get(name)
        if m is None:
            raise ApiError(404, f"the model {echo(name)!r} does not exist; served models: {', '.join(self.models)}",
                           "invalid_request_error", "model_not_found", "model")
        return m

    async def render(self, m: ServedModel, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as prompt text, rendered in a template worker (never on the event loop)."""
        try:
            return await asyncio.to_thread(self.renderers[id(m.template)].render, messages, add_generation_prompt)
        except TemplateError as e:
            raise ApiError(400, str(e), code="template_error", param="messages") from None

    def close(self) -> None:
        for r in self.renderers.values():
            r.close()


def state_of(request: Any) -> ServerState:
    """The :class:`ServerState` of the app a request reached."""
    return request.app.state.server
