"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own per app.

Names follow vLLM's where one exists (``*_requests_running``, ``*_time_to_first_token_seconds``,
``*_inter_token_latency_seconds``, ``*_e2e_request_latency_seconds``) with the ``lmforge_``
prefix. The running and waiting gauges are read from the engines at scrape time, so they
are exact whenever they are looked at.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily


class Load(Protocol):
    """What the gauges read of the scheduler (a protocol: the scheduler imports this module)."""

    engines: dict[str, Any]  # by model name: InferenceEngine (num_running, waiting)

    def submitted(self) -> int: ...

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class _EngineCollector:
    def __init__(self, scheduler: Load) -> None:
        self.scheduler = scheduler

    def collect(self):
        running = GaugeMetricFamily("lmforge_requests_running", "Requests in the batch now (KV-cache rows)", labels=["model"])
        waiting = GaugeMetricFamily("lmforge_requests_waiting", "Requests queued for a batch row", labels=["model"])
        pending = self.scheduler.submitted()
        for name, e in self.scheduler.engines.items():
            running.add_metric([name], e.num_running)
            waiting.add_metric([name], len(e.waiting))
        submitted = GaugeMetricFamily(
            "lmforge_requests_submitted", "Requests handed to the engine loop, not yet queued by an engine"
        )
        submitted.add_metric([], pending)
        yield running
        yield waiting
        yield submitted


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter(
            "lmforge_requests_finished", "Sequences finished, by reason", ["model", "finish_reason"], registry=r
        )
        self.aborted = Counter("lmforge_requests_aborted", "Sequences aborted (client gone, timeout)", ["model"], registry=r)
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds", "Time from submission to the first token", ["model"],
            buckets=_LATENCY, registry=r,
        )
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds", "Time between two tokens of a sequence", ["model"],
            buckets=_ITL, registry=r,
        )
        self.e2e = Histogram(
            "lmforge_e2e_request_latency_seconds", "Time from submission to the last token", ["model"],
            buckets=_LATENCY, registry=r,
        )
        self.decode_batch = Histogram(
            "lmforge_decode_batch_rows", "Sequences decoded together in one engine step", ["model"],
            buckets=_BATCH, registry=r,
        )
        self.http = Counter(
            "lmforge_http_requests", "HTTP responses by route and status", ["method", "path", "status"], registry=r
        )
        self.http_latency = Histogram(
            "lmforge_http_request_duration_seconds", "HTTP request handling time", ["path"], buckets=_LATENCY,
            registry=r,
        )
        self.rate_limited = Counter("lmforge_rate_limited", "Requests refused by the rate limit", registry=r)
        self.auth_throttled = Counter(
            "lmforge_auth_throttled", "Requests refused after too many failed API-key attempts from their address",
            registry=r,
        )

    def attach(self, scheduler: Load) -> None:
        self.registry.register(_EngineCollector(scheduler))
        for name in scheduler.engines:  # every series shows (at 0) before its first event
            for m in (self.prompt_tokens, self.generation_tokens, self.aborted, self.ttft, self.itl, self.e2e,
                      self.decode_batch):
                m.labels(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)
