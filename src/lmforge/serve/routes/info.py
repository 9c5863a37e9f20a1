"""The routes that describe the server: the web chat page, probes, metrics, the model list."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..errors import error_response
from ..metrics import CONTENT_TYPE
from ..state import state_of

STATIC = Path(__file__).parent.parent / "static"
# the page loads nothing from elsewhere and cannot be framed
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)


@router.get("/health", summary="liveness: the process answers and its engine loop thread runs")
async def health(request: Request):
    scheduler = state_of(request).scheduler
    if not scheduler.alive:
        return error_response(503, "the engine loop is not running", "server_error", "engine_down")
    return {"status": "ok", "models": scheduler.snapshot()}


@router.get("/ready", summary="readiness: the engine loop comes round and every model produces finite outputs")
async def ready(request: Request):
    ok, why = state_of(request).scheduler.readiness()
    if not ok:
        return error_response(503, why, "server_error", "not_ready")
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus(request: Request):
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", summary="the served models (base and adapters)")
async def list_models(request: Request):
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge",
         "root": m.source or m.name, "parent": m.parent, "max_model_len": m.engine.max_seq_len}
        for m in state_of(request).models.values()
    ]}
