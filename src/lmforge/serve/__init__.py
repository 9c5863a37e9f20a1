"""The OpenAI-compatible server: `lmforge serve` (FastAPI + uvicorn, one engine loop).

- ``app.py``: ``create_app(models, config)`` -> the FastAPI app (a small factory);
- ``state.py``: ``ServeConfig``, ``ServedModel`` and the ``ServerState`` every route shares;
- ``routes/``: the routes; a generation route decodes (``decode.py``), submits and waits
  (``submit.py``) and encodes in the OpenAI wire format (``wire.py``: chunks, logprobs, usage);
- ``errors.py``: the error body;  ``handlers.py``: exceptions -> error responses;
- ``guard.py``: the ASGI middleware (request ids, limits, API keys, rate limits, access logs);
  ``access.py``: which paths are public (declared once);  ``auth.py``: API keys, rate limiters;
- ``scheduler.py``: the one engine loop thread (continuous batching, aborts);
- ``templates.py``: chat templates rendered in worker processes;  ``metrics.py``: Prometheus;
- ``protocol.py``: request bodies;  ``logs.py``: JSON logs, PII-masked bodies;
- ``connections.py`` + ``server.py``: uvicorn (guarded HTTP protocol) in the foreground or on a thread;
- ``commands.py``: the `lmforge serve` command;  ``static/index.html``: the chat page.

Needs the ``serve`` extra (``pip install -e ".[serve]"``): fastapi, uvicorn, prometheus-client.
"""
