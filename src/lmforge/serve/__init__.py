"""The OpenAI-compatible server: `lmforge serve` (FastAPI + uvicorn, one engine loop).

- ``app.py``: ``create_app(models, config)`` -> the FastAPI app, its routes and the guard
  middleware (request ids, limits, API keys, rate limits, access logs);
- ``scheduler.py``: the one engine loop thread (continuous batching, aborts);
- ``auth.py``: API keys and token-bucket rate limits;  ``metrics.py``: Prometheus;
- ``protocol.py``: request bodies;  ``logs.py``: JSON logs, PII-masked bodies;
- ``server.py``: uvicorn in the foreground or on a background thread;
- ``commands.py``: the `lmforge serve` parser and handler;  ``static/index.html``: the chat page.

Needs the ``serve`` extra (``pip install -e ".[serve]"``): fastapi, uvicorn, prometheus-client.
"""
