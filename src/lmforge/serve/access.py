"""Which routes need an API key, declared once: the guard enforces it, the OpenAPI schema shows it.

Default deny: every path not in :data:`PUBLIC_PATHS` needs a key whenever the server has keys
(a new route is protected without saying so; a public one must be listed here). ``/metrics``
is public only with ``--metrics-public`` or when the server has no keys. Routes do not repeat
the declaration: :func:`document_auth` marks every other operation of the schema with the
bearer scheme, which is all FastAPI's per-route ``Security(HTTPBearer(auto_error=False))``
did (it never refused anything: the guard answers 401 before a route runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .state import ServeConfig

#: Probes: exempt from the in-flight cap and the access log, public.
PROBES = frozenset({"/health", "/ready"})
#: Paths anyone may call: the web chat page, the probes, the API's own documentation.
PUBLIC_PATHS = frozenset({"/", *PROBES, "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico"})
METRICS_PATH = "/metrics"

SCHEME = "HTTPBearer"
SCHEME_DOC = {"type": "http", "scheme": "bearer", "description": "an API key of the server (when it has any)"}


def public_paths(config: ServeConfig) -> frozenset[str]:
    """The paths this server answers without a key."""
    if config.metrics_public or not config.api_keys.enabled:
        return PUBLIC_PATHS | {METRICS_PATH}
    return PUBLIC_PATHS


def document_auth(app: FastAPI) -> None:
    """Mark every operation outside :data:`PUBLIC_PATHS` in ``app.openapi()`` as needing the key."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = build()  # cached by FastAPI after the first call: mark it once
        if first:
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = dict(SCHEME_DOC)
            for path, operations in schema.get("paths", {}).items():
                if path not in PUBLIC_PATHS:
                    for op in operations.values():
                        op["security"] = [{SCHEME: []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
