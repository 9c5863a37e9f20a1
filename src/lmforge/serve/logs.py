"""Structured logs: one JSON object a line, and PII masking of request bodies.

Records of the ``lmforge.serve`` logger carry their structured fields in
``extra={"fields": {...}}``. Request bodies are not logged unless the server runs with
``--log-requests``, and then every string in them passes through
:class:`lmforge.data.pii.PiiMasker` first (emails, phones, URLs, IPs, cards, user names).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = "lmforge.serve"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", stream=None) -> None:
    """JSON lines on stderr for the server's logger and uvicorn's error logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER, "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


class BodyMasker:
    """Masks PII in every string of a JSON-like value (request bodies for the log)."""

    def __init__(self) -> None:
        from ..data.pii import PiiMasker

        self.masker = PiiMasker()

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.masker.mask(value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


_log = logging.getLogger(LOGGER)


def log_body(masker: BodyMasker | None, request_id: str, route: str, body: Any) -> None:
    """The request body (a pydantic model), PII-masked, when the server logs bodies (``masker``)."""
    if masker is not None:
        _log.info("request body", extra={"fields": {
            "event": "request_body", "request_id": request_id, "route": route,
            "body": masker(body.model_dump(exclude_none=True)),
        }})


def log_completion(request_id: str, model: str, prompt_tokens: int, comps,
                   completion_tokens: int | None = None) -> None:
    """One line for a finished request: tokens, finish reasons and times (``comps``: its completions,
    or None for a stream, which counts ``completion_tokens`` as it goes)."""
    if completion_tokens is None:
        completion_tokens = sum(len(c.token_ids) for c in comps)
    fields = {"event": "completion", "request_id": request_id, "model": model,
              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    if comps:
        fields["finish_reasons"] = sorted({c.finish_reason for c in comps})
        fields["ttft_s"] = round(max(c.time_to_first_token for c in comps), 4)
        fields["latency_s"] = round(max(c.latency for c in comps), 4)
    _log.info("completion", extra={"fields": fields})
