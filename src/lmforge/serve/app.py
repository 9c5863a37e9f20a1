"""The OpenAI-compatible HTTP server: ``create_app(models, config)`` -> a FastAPI app.

Routes: ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent
events, or whole), ``GET /v1/models``, ``POST /tokenize`` and ``/detokenize``,
``GET /health``, ``GET /metrics`` (Prometheus) and the web chat page at ``/``.

Every request passes one ASGI middleware (:class:`~lmforge.serve.guard.Guard`) before
any route: request ids, header/body limits and timeouts, API keys, failed-login throttling,
rate limits, status metrics and access logs. Every error, whichever layer raises it (the
routes, the guard, or uvicorn's HTTP protocol, see ``serve/connections.py``), leaves as an
OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}``; FastAPI's
validation errors (422) become 400 with the field named in the message.

Chat templates render in a worker thread under a time and size budget
(:class:`~lmforge.tokenizer.chat.ChatTemplate`), never on the event loop.

Generation goes through :class:`~lmforge.serve.scheduler.Scheduler`: one engine loop
thread, continuous batching across concurrent requests, a request aborted (its batch
row freed) as soon as its client disconnects or its time runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LmforgeError
from ..infer.chat import end_of_turn_ids
from ..infer.sampling import SamplingParams
from .auth import ApiKeys
from .errors import ApiError, echo, error_body, error_response, error_type
from .guard import Guard
from .logs import LOGGER, BodyMasker
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from .scheduler import Event, ModelFault, Overloaded, Scheduler, TimedOut
from .templates import TemplateError, TemplateRenderer

log = logging.getLogger(LOGGER)

STATIC = Path(__file__).parent / "static"


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


# ---- helpers ---------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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


_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "content": "a string, a list of content parts ({'type': 'text', 'text': ...}), or null",
    "stop": "a string or a list of strings",
}


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part or part in (
        "TextPart", "OtherPart"
    )


def _stops(value: str | list[str] | None, cap: int) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > cap:
        raise ApiError(400, f"stop: at most {cap} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop strings must not be empty", param="stop")
    if any(len(s) > 256 for s in stops):
        raise ApiError(400, "stop: a stop string is longer than 256 characters", param="stop")
    return stops


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else (seed + i) % (1 << 64)


def _flatten_content(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text":
            raise ApiError(400, f"messages.{i}.content: content of type {p.type!r} is not supported (text only)",
                           param=f"messages.{i}.content")
        parts.append(p.text)
    return "".join(parts)


def _template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": _flatten_content(m, i)})
    return out


class _Token:
    """Text of single tokens for logprobs (cached: the same ids recur)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.tok.decode([i]) if self.tok is not None else str(i)
            if len(self.cache) < 200_000:
                self.cache[i] = s
        return s


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- the app -------------------------------------------------------------------------------
def create_app(models: Sequence[ServedModel], config: ServeConfig | None = None,
               scheduler: Scheduler | None = None) -> FastAPI:
    """The FastAPI app over ``models`` (the first is the base, the default model name)."""
    if not models:
        raise LmforgeError("the server needs at least one model")
    config = config or ServeConfig()
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise LmforgeError("two served models have the same name")
    base = models[0]
    metrics = ServerMetrics()
    scheduler = scheduler or Scheduler({m.name: m.engine for m in models}, metrics, max_waiting=config.max_waiting,
                                       stall_timeout=config.stall_timeout)
    scheduler.metrics = metrics
    metrics.attach(scheduler)
    masker = BodyMasker() if config.log_requests else None
    token_text = {m.name: _Token(m.tokenizer) for m in models}
    # one renderer (worker processes) per template: adapters share their base model's
    renderers: dict[int, TemplateRenderer] = {}
    for m in models:
        if id(m.template) not in renderers:
            renderers[id(m.template)] = TemplateRenderer(
                m.template, timeout=config.template_timeout, memory_mb=config.template_memory_mb,
                max_chars=max(1 << 20, 4 * config.max_body_bytes))

    async def render(m: ServedModel, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as prompt text, rendered in a template worker (never on the event loop)."""
        try:
            return await asyncio.to_thread(renderers[id(m.template)].render, messages, add_generation_prompt)
        except TemplateError as e:
            raise ApiError(400, str(e), code="template_error", param="messages") from None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        log.info("serving", extra={"fields": {"event": "start", "models": list(by_name),
                                             "auth": config.api_keys.enabled}})
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop, config.drain_timeout)
            for r in renderers.values():
                r.close()
            log.info("stopped", extra={"fields": {"event": "stop"}})

    app = FastAPI(
        title="lmforge",
        version=_version(),
        description="OpenAI-compatible completions and chat over lmforge checkpoints.",
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.config = config
    app.state.models = by_name
    bearer = HTTPBearer(auto_error=False, description="an API key of the server (when it has any)")

    # ---- errors: always OpenAI-style JSON --------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        ctype = request.headers.get("content-type", "")
        if message == "the request body must be a JSON object" and ctype and "json" not in ctype.lower():
            message = f"send the request body as JSON with 'Content-Type: application/json' (got {ctype!r})"
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, exc: Overloaded):
        return error_response(503, str(exc), "server_overloaded", "overloaded", headers={"Retry-After": "1"})

    @app.exception_handler(ModelFault)
    async def on_model_fault(request: Request, exc: ModelFault):
        return error_response(503, str(exc), "server_error", "model_output_invalid")

    @app.exception_handler(LmforgeError)
    async def on_user_error(request: Request, exc: LmforgeError):
        return error_response(400, str(exc), code="invalid_request")

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

    # ---- shared request plumbing -----------------------------------------------------------
    def model_of(name: str | None) -> ServedModel:
        if name is None or name == "":
            return base
        m = by_name.get(name)
        if m is None:
            raise ApiError(404, f"the model {echo(name)!r} does not exist; served models: {', '.join(by_name)}",
                           "invalid_request_error", "model_not_found", "model")
        return m

    def log_body(request: Request, kind: str, body: Any) -> None:
        if masker is not None:
            log.info("request body", extra={"fields": {
                "event": "request_body", "request_id": request.state.request_id, "route": kind,
                "body": masker(body.model_dump(exclude_none=True)),
            }})

    def check_common(req, m: ServedModel) -> None:
        if req.n > config.max_n:
            raise ApiError(400, f"n: at most {config.max_n} choices a request, got {req.n}", param="n")
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
        if req.stop_token_ids:
            bad = [t for t in req.stop_token_ids if t >= m.engine.vocab_size]
            if bad:
                raise ApiError(400, f"stop_token_ids: {bad[0]} is outside the vocabulary (0..{m.engine.vocab_size - 1})",
                               param="stop_token_ids")

    def params_for(req, m: ServedModel, max_tokens: int, stops: list[str], stop_ids: list[int],
                   logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        p = SamplingParams(
            max_tokens=max_tokens,
            # below 1e-5 the scaled logits overflow: greedy, as vLLM does
            temperature=1.0 if req.temperature is None else (0.0 if req.temperature < 1e-5 else req.temperature),
            top_k=max(0, req.top_k or 0),
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=stops,
            stop_token_ids=sorted(set(stop_ids) | set(req.stop_token_ids or [])),
            ignore_eos=req.ignore_eos,
            seed=None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        return p.validate(m.engine.vocab_size)

    def room(m: ServedModel, prompt_len: int, requested: int | None, default: int) -> int:
        ctx = m.engine.max_seq_len
        if prompt_len >= ctx:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; the prompt has {prompt_len} "
                           "(at least one more is needed to generate)", code="context_length_exceeded")
        if requested is not None:
            if requested > config.max_tokens_cap:
                raise ApiError(400, f"max_tokens: at most {config.max_tokens_cap}, got {requested}",
                               param="max_tokens")
            if prompt_len + requested > ctx:
                raise ApiError(400, f"this model's maximum context length is {ctx} tokens; you requested "
                               f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} to generate)",
                               param="max_tokens", code="context_length_exceeded")
            return requested
        return max(1, min(default, config.max_tokens_cap, ctx - prompt_len))

    async def run(request: Request, m: ServedModel, prompts: list[list[int]], params: list[SamplingParams]):
        """Submit; return (queue, rids) for the caller to consume."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        # the engine stops the computation at the same deadline (between two prompt chunks or
        # decode steps) whether or not the handler is still there to answer 504
        rids = scheduler.submit(m.name, prompts, params, loop, q, timeout=config.request_timeout)
        return q, rids

    async def collect(request: Request, q: asyncio.Queue, rids: list[str], count: int):
        """Wait for ``count`` sequences to finish; abort them if the client leaves or time runs out."""
        results: dict[int, Any] = {}
        deadline = time.monotonic() + config.request_timeout

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
                work.result()  # raises the engine's error, if any
                return [results[i] for i in range(count)]
            if watch in done:
                scheduler.abort(rids)
                raise ApiError(499, "the client closed the connection", code="client_closed")
            scheduler.abort(rids)
            raise ApiError(504, f"the request took longer than {config.request_timeout:g} s", "timeout_error",
                           "timeout")
        finally:
            for t in (work, watch):
                if not t.done():
                    t.cancel()

    def engine_error(err: BaseException) -> ApiError:
        if isinstance(err, TimedOut):
            return ApiError(504, f"the request took longer than {config.request_timeout:g} s", "timeout_error",
                            "timeout")
        if isinstance(err, Overloaded):
            return ApiError(503, str(err), "server_overloaded", "overloaded", headers={"Retry-After": "1"})
        if isinstance(err, ModelFault):
            return ApiError(503, str(err), "server_error", "model_output_invalid")
        if isinstance(err, LmforgeError):
            return ApiError(400, str(err), code="invalid_request")
        return ApiError(500, "internal server error", "server_error", "internal_error")

    async def stream_events(q: asyncio.Queue, rids: list[str], count: int, on_event, finish) -> AsyncIterator[str]:
        """SSE lines from the sequences' events; abort all if the client goes away."""
        deadline = time.monotonic() + config.request_timeout
        left = count
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=max(0.001, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    scheduler.abort(rids)
                    left = 0
                    yield _sse(error_body(f"the request took longer than {config.request_timeout:g} s",
                                          "timeout_error", "timeout"))
                    yield "data: [DONE]\n\n"
                    return
                if ev.kind == "error":
                    scheduler.abort(rids)
                    left = 0
                    err = engine_error(ev.error)
                    if err.status >= 500 and not isinstance(ev.error, (Overloaded, ModelFault)):
                        log.error("generation failed", exc_info=ev.error)
                    yield _sse(error_body(err.message, err.type, err.code))
                    yield "data: [DONE]\n\n"
                    return
                for chunk in on_event(ev):
                    yield _sse(chunk)
                if ev.kind == "done":
                    left -= 1
            for chunk in finish():
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client went away (the generator was closed or cancelled)
                scheduler.abort(rids)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def chat_logprobs(m: ServedModel, lps, top: bool) -> list[dict[str, Any]]:
        tt = token_text[m.name]
        out = []
        for lp in lps or []:
            s = tt(lp.token_id)
            out.append({
                "token": s, "logprob": lp.logprob, "bytes": list(s.encode("utf-8")),
                "top_logprobs": [{"token": tt(i), "logprob": v, "bytes": list(tt(i).encode("utf-8"))}
                                 for i, v in lp.top] if top else [],
            })
        return out

    # ---- routes ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        })

    @app.get("/health", summary="liveness: the process answers and its engine loop thread runs")
    async def health():
        if not scheduler.alive:
            return error_response(503, "the engine loop is not running", "server_error", "engine_down")
        return {"status": "ok", "models": scheduler.snapshot()}

    @app.get("/ready", summary="readiness: the engine loop comes round and every model produces finite outputs")
    async def ready():
        ok, why = scheduler.readiness()
        if not ok:
            return error_response(503, why, "server_error", "not_ready")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Security(bearer)], summary="the served models (base and adapters)")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge",
             "root": m.source or m.name, "parent": m.parent, "max_model_len": m.engine.max_seq_len}
            for m in by_name.values()
        ]}

    @app.post("/tokenize", dependencies=[Security(bearer)], summary="text or messages -> token ids")
    async def tokenize(req: TokenizeRequest):
        m = model_of(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'")
        if req.messages is not None:
            if len(req.messages) > config.max_messages:
                raise ApiError(400, f"messages: at most {config.max_messages}, got {len(req.messages)}",
                               param="messages")
            text = await render(m, _template_messages(req.messages), req.add_generation_prompt)
        else:
            text = req.prompt
        ids = m.tokenizer.encode(text) if text else []
        return {"tokens": ids, "count": len(ids), "max_model_len": m.engine.max_seq_len}

    @app.post("/detokenize", dependencies=[Security(bearer)], summary="token ids -> text")
    async def detokenize(req: DetokenizeRequest):
        m = model_of(req.model)
        bad = [t for t in req.tokens if t >= m.engine.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: {bad[0]} is outside the vocabulary (0..{m.engine.vocab_size - 1})",
                           param="tokens")
        return {"prompt": m.tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions", dependencies=[Security(bearer)], summary="chat completion (OpenAI API)")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        m = model_of(req.model)
        log_body(request, "chat", req)
        check_common(req, m)
        if len(req.messages) > config.max_messages:
            raise ApiError(400, f"messages: at most {config.max_messages} messages a request, got {len(req.messages)}",
                           param="messages")
        if req.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        text = await render(m, _template_messages(req.messages), True)
        ids = m.engine.encode_prompt(text)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if requested is not None and requested < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        max_tokens = room(m, len(ids), requested, config.max_tokens_cap)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        base_params = params_for(req, m, max_tokens, _stops(req.stop, config.max_stop),
                                 end_of_turn_ids(m.tokenizer), logprobs, None)
        plist = [dataclasses.replace(base_params, seed=_seed(req.seed, i)) for i in range(req.n)]
        q, rids = await run(request, m, [ids] * req.n, plist)
        cid = f"chatcmpl-{request.state.request_id}"
        created = int(time.time())
        top = bool(req.top_logprobs)

        if not req.stream:
            try:
                comps = await collect(request, q, rids, req.n)
            except (LmforgeError, RuntimeError) as e:
                raise engine_error(e) from None
            choices = [{
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": chat_logprobs(m, c.logprobs, top)} if req.logprobs else None,
                "finish_reason": c.finish_reason,
            } for i, c in enumerate(comps)]
            log_done(request, m, len(ids), comps)
            return {"id": cid, "object": "chat.completion", "created": created, "model": m.name,
                    "choices": choices, "usage": usage(len(ids), sum(len(c.token_ids) for c in comps)),
                    "system_fingerprint": None}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        produced = [0] * req.n

        def chunk(choices, **extra):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": m.name,
                    "choices": choices, **extra}

        def on_event(ev: Event):
            if ev.kind == "delta":
                d = ev.delta
                produced[ev.index] += len(d.token_ids)
                if d.text or req.logprobs:
                    yield chunk([{"index": ev.index, "delta": {"content": d.text}, "logprobs":
                                  {"content": chat_logprobs(m, d.logprobs, top)} if req.logprobs else None,
                                  "finish_reason": None}])
            else:
                yield chunk([{"index": ev.index, "delta": {}, "logprobs": None,
                              "finish_reason": ev.completion.finish_reason}])

        def finish():
            if include_usage:
                yield chunk([], usage=usage(len(ids), sum(produced)))

        async def body():
            ended = False
            try:
                for i in range(req.n):
                    yield _sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}]))
                async for line in stream_events(q, rids, req.n, on_event, finish):
                    yield line
                ended = True
                log_done(request, m, len(ids), None, sum(produced))
            finally:
                if not ended:  # the client left before the stream began or ended
                    scheduler.abort(rids)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=[Security(bearer)], summary="text completion (OpenAI legacy API)")
    async def completions(req: CompletionRequest, request: Request):
        m = model_of(req.model)
        log_body(request, "completions", req)
        check_common(req, m)
        if req.suffix:
            raise ApiError(400, "suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "best_of other than n is not supported by this server", param="best_of")
        p = req.prompt
        if isinstance(p, str):
            prompts: list[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise ApiError(400, "prompt: no prompt given", param="prompt")
        if len(prompts) > config.max_prompts:
            raise ApiError(400, f"prompt: at most {config.max_prompts} prompts a request, got {len(prompts)}",
                           param="prompt")
        if len(prompts) * req.n > config.max_waiting:
            raise ApiError(400, f"prompts x n is {len(prompts) * req.n}; the limit is {config.max_waiting}",
                           param="n")
        id_lists = []
        for j, pr in enumerate(prompts):
            try:
                id_lists.append(m.engine.encode_prompt(pr))
            except LmforgeError as e:
                raise ApiError(400, f"prompt {j}: {e}", param="prompt") from None
        if req.stream and req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (prompt scoring) is supported only with stream: false",
                           param="echo")
        requested = req.max_tokens
        drop_last = False
        if requested == 0:
            if not req.echo:
                raise ApiError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
            requested, drop_last = 1, True  # echo with nothing new: score the prompt only
        counts = [room(m, len(ids), requested, config.default_completion_tokens) for ids in id_lists]
        stops = _stops(req.stop, config.max_stop)
        want_prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        seqs, plist, owners = [], [], []
        for j, ids in enumerate(id_lists):
            base_params = params_for(req, m, counts[j], stops, [], req.logprobs, want_prompt_lp)
            for i in range(req.n):
                seqs.append(ids)
                plist.append(dataclasses.replace(base_params, seed=_seed(req.seed, i)))
                owners.append(j)
        q, rids = await run(request, m, seqs, plist)
        cid = f"cmpl-{request.state.request_id}"
        created = int(time.time())
        tt = token_text[m.name]
        prompt_texts = [pr if isinstance(pr, str) else m.tokenizer.decode(ids)
                        for pr, ids in zip(prompts, id_lists)]
        prompt_total = sum(len(ids) for ids in id_lists)

        def legacy_logprobs(token_ids: list[int], lps: list, start: int, prompt_lps=None) -> dict[str, Any]:
            tokens, values, tops, offsets = [], [], [], []
            pos = start
            entries = []
            if prompt_lps is not None:
                entries += [(t, lp) for t, lp in zip(token_ids[: len(prompt_lps)], prompt_lps)]
                token_ids = token_ids[len(prompt_lps):]
            entries += list(zip(token_ids, lps))
            for t, lp in entries:
                s = tt(t)
                tokens.append(s)
                offsets.append(pos)
                pos += len(s)
                if lp is None:
                    values.append(None)
                    tops.append(None)
                else:
                    values.append(lp.logprob)
                    tops.append({tt(i): v for i, v in lp.top} if lp.top else ({s: lp.logprob} if req.logprobs else {}))
            return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

        def trimmed(c):
            if drop_last:
                return [], "", (c.logprobs or [])[:0], "length"
            return c.token_ids, c.text, c.logprobs or [], c.finish_reason

        if not req.stream:
            try:
                comps = await collect(request, q, rids, len(seqs))
            except (LmforgeError, RuntimeError) as e:
                raise engine_error(e) from None
            choices = []
            for k, c in enumerate(comps):
                j = owners[k]
                out_ids, out_text, out_lps, reason = trimmed(c)
                lp = None
                if req.logprobs is not None:
                    if req.echo:
                        lp = legacy_logprobs(list(c.prompt_ids) + list(out_ids), out_lps, 0, c.prompt_logprobs)
                    else:
                        lp = legacy_logprobs(list(out_ids), out_lps, len(prompt_texts[j]))
                text = (prompt_texts[j] + out_text) if req.echo else out_text
                choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": reason})
            generated = sum(len(trimmed(c)[0]) for c in comps)
            log_done(request, m, prompt_total, comps)
            return {"id": cid, "object": "text_completion", "created": created, "model": m.name,
                    "choices": choices, "usage": usage(prompt_total, generated), "system_fingerprint": None}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        produced = [0] * len(seqs)
        offsets = [len(prompt_texts[owners[k]]) for k in range(len(seqs))]

        def chunk(choices, **extra):
            return {"id": cid, "object": "text_completion", "created": created, "model": m.name,
                    "choices": choices, **extra}

        def on_event(ev: Event):
            k = ev.index
            if ev.kind == "delta":
                if drop_last:
                    return
                d = ev.delta
                produced[k] += len(d.token_ids)
                lp = legacy_logprobs(d.token_ids, d.logprobs or [], offsets[k]) if req.logprobs is not None else None
                if lp:
                    offsets[k] += sum(len(s) for s in lp["tokens"])
                if d.text or lp:
                    yield chunk([{"index": k, "text": d.text, "logprobs": lp, "finish_reason": None}])
            else:
                yield chunk([{"index": k, "text": "", "logprobs": None,
                              "finish_reason": "length" if drop_last else ev.completion.finish_reason}])

        def finish():
            if include_usage:
                yield chunk([], usage=usage(prompt_total, sum(produced)))

        async def body():
            ended = False
            try:
                if req.echo:  # the prompt first, then what is generated
                    for k in range(len(seqs)):
                        yield _sse(chunk([{"index": k, "text": prompt_texts[owners[k]], "logprobs": None,
                                           "finish_reason": None}]))
                async for line in stream_events(q, rids, len(seqs), on_event, finish):
                    yield line
                ended = True
                log_done(request, m, prompt_total, None, sum(produced))
            finally:
                if not ended:  # the client left before the stream began or ended
                    scheduler.abort(rids)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def log_done(request: Request, m: ServedModel, prompt_tokens: int, comps, completion_tokens: int | None = None):
        if completion_tokens is None:
            completion_tokens = sum(len(c.token_ids) for c in comps)
        fields = {"event": "completion", "request_id": request.state.request_id, "model": m.name,
                  "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        if comps:
            fields["finish_reasons"] = sorted({c.finish_reason for c in comps})
            fields["ttft_s"] = round(max(c.time_to_first_token for c in comps), 4)
            fields["latency_s"] = round(max(c.latency for c in comps), 4)
        log.info("completion", extra={"fields": fields})

    # ---- middleware (the guard innermost of the two, CORS outermost when enabled) -------------
    app.add_middleware(Guard, config=config, metrics=metrics)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    return app


def _version() -> str:
    from .. import __version__

    return __version__
