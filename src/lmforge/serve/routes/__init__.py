"""The HTTP routes, one module a group; each generation route decodes the request
(``serve/decode.py``), submits it (``serve/submit.py``) and encodes the answer (``serve/wire.py``).

None declares authentication: ``serve/access.py`` says which paths are public, once.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from . import chat, completions, info, tokens


_MODULES = (info, tokens, chat, completions)


def include_routes(app: FastAPI) -> None:
    for module in _MODULES:
        app.include_router(module.router)


def all_routes() -> list[APIRoute]:
    return [r for module in _MODULES for r in module.router.routes]


def route_paths() -> frozenset[str]:
    """The paths of every route here (the guard labels any other path "other" in its metrics)."""
    return frozenset(r.path for r in all_routes())
