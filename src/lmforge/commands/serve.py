"""`lmforge serve CKPT [--adapter name=path ...]`: the command's config dataclass (its flags,
validated in ``__post_init__``) and ``run_serve(cfg)``.

Kept free of heavy imports at module level: the command line builds its parser from the dataclass.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import CHECKPOINT_HELP, option
from ..errors import ConfigError, LmforgeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_SECURITY = "security and limits"


@dataclass(kw_only=True)
class ServeCommandConfig:
    """``lmforge serve CKPT``: the server's flags (the ``ServeConfig`` of :mod:`lmforge.serve.app` is
    built from them, with the API keys loaded and the proxies checked)."""

    checkpoint: str = option(help=CHECKPOINT_HELP, positional=True)
    host: str = option("127.0.0.1", "address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    port: int = option(8000)
    model_name: str | None = option(None, "the base model's name in the API (default: the checkpoint folder's name)")
    adapter: list[str] = option([], "serve a LoRA adapter on the base as model NAME (repeatable)", metavar="NAME=PATH")
    device: str = option("cpu", group="engine")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "compute dtype (auto: see `lmforge env`)", group="engine")
    quantize: Literal["none", "bf16", "int8", "int4"] = option("none", "quantize the weights at load", group="engine")
    max_batch_size: int = option(16, "sequences decoded together per model (default 16)", group="engine")
    max_seq_len: int | None = option(None, "cap on prompt + completion tokens (default: the model's context)",
                                     group="engine")
    threads: int | None = option(None, "torch CPU threads (default: the usable cores, cgroup quota included)",
                                 group="engine")
    max_step_tokens: int = option(256, "prompt tokens prefilled per engine step, between the running decodes "
                                  "(default 256)", group="engine")
    kv_cache_gb: float | None = option(None, "KV-cache memory budget (default: what the batch could use, at most half "
                                       "the free memory)", group="engine")
    stall_timeout: float = option(30.0, "seconds the engine loop may take to come round before /ready fails "
                                  "(default 30)", group="engine")
    api_key: list[str] = option([], "an API key clients must present (repeatable; vLLM's flag). A key on the command "
                                "line is visible to other users of the machine (ps): prefer --api-key-file or "
                                "LMFORGE_API_KEYS there", metavar="KEY", group=_SECURITY)
    api_key_file: str | None = option(None, "file of API keys, one a line ('#' comments)", group=_SECURITY)
    rate_limit: float = option(0.0, "requests a minute per key (0: off)", metavar="RPM", group=_SECURITY)
    rate_burst: int | None = option(None, "requests at once per key (default: RPM/6)", group=_SECURITY)
    max_body_bytes: int = option(1 << 20, "request body limit (default 1 MiB) -> 413", group=_SECURITY)
    max_header_bytes: int = option(16 << 10, "request header limit (default 16 KiB) -> 431", group=_SECURITY)
    max_n: int = option(8, "choices a request (default 8)", group=_SECURITY)
    max_tokens: int = option(4096, "cap on max_tokens (default 4096)", group=_SECURITY)
    max_messages: int = option(512, "messages in a chat request (default 512)", group=_SECURITY)
    max_prompts: int = option(32, "prompts in a /v1/completions request (default 32)", group=_SECURITY)
    max_waiting: int = option(256, "queued sequences before 503 (default 256)", group=_SECURITY)
    request_timeout: float = option(300.0, "seconds a request may run (default 300)", group=_SECURITY)
    limit_concurrency: int = option(512, "requests in flight before 503 (default 512)", group=_SECURITY)
    auth_fail_limit: float = option(10.0, "failed API-key attempts a minute per client address before 429 "
                                    "(default 10; 0: off)", metavar="N", group=_SECURITY)
    metrics_public: bool = option(False, "serve /metrics without a key when keys are set", group=_SECURITY)
    trusted_proxies: list[str] = option([], "believe X-Forwarded-For only from these addresses or networks "
                                        "(repeatable; default: none)", metavar="ADDR", group=_SECURITY)
    header_timeout: float = option(10.0, "seconds a connection has to send a whole request head (default 10) -> 408",
                                   group=_SECURITY)
    body_timeout: float = option(30.0, "seconds a request body has to arrive (default 30) -> 408", group=_SECURITY)
    max_pending_connections: int = option(256, "connections without a complete request head; beyond, the oldest is "
                                          "closed (default 256)", group=_SECURITY)
    template_timeout: float = option(2.0, "seconds a chat template may render (default 2)", group=_SECURITY)
    template_memory_mb: int = option(512, "memory a chat-template render may use (default 512)", group=_SECURITY)
    cors_origin: list[str] = option([], "allow browser calls from ORIGIN (repeatable; CORS is off by default)",
                                    metavar="ORIGIN", group=_SECURITY)
    log_requests: bool = option(False, "log request bodies (PII-masked); off by default", group="operations")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", group="operations")
    drain_timeout: float = option(30.0, "seconds to finish in-flight requests on shutdown", group="operations")

    def __post_init__(self) -> None:
        for flag in ("max_body_bytes", "max_header_bytes", "max_n", "max_tokens", "max_messages", "max_prompts",
                     "max_waiting", "limit_concurrency", "max_pending_connections", "template_memory_mb"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(self, flag)}")
        for flag in ("request_timeout", "header_timeout", "body_timeout", "template_timeout", "stall_timeout"):
            if not getattr(self, flag) > 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(self, flag)}")
        if self.drain_timeout < 0 or self.auth_fail_limit < 0:
            raise ConfigError("--drain-timeout and --auth-fail-limit must not be negative")
        self.trusted_proxies = _trusted_proxies(self.trusted_proxies)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.max_batch_size < 1:
            raise ConfigError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.max_step_tokens < 1:
            raise ConfigError(f"--max-step-tokens must be at least 1, got {self.max_step_tokens}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ConfigError(f"--kv-cache-gb must be positive, got {self.kv_cache_gb}")


def _trusted_proxies(specs: list[str]) -> list[str]:
    """Addresses or networks (``10.0.0.0/8``) whose X-Forwarded-For is believed, checked."""
    import ipaddress

    out = []
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ConfigError(f"--trusted-proxies: {part!r} is not an IP address or network") from None
            out.append(part)
    return out


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=PATH, got {spec!r}")
        if not _NAME.match(name):
            raise ConfigError(f"adapter name {name!r}: use letters, digits and . _ : / - (up to 128)")
        if not Path(path).is_dir():
            raise ConfigError(f"adapter {name!r}: {path} is not a directory")
        if any(n == name for n, _ in out):
            raise ConfigError(f"adapter name {name!r} is given twice")
        out.append((name, Path(path)))
    return out


def _adapter_loader():
    """``load_adapter(model, adapter_dir) -> model`` of lmforge.checkpoint, then LoRA merged
    into the weights where the method allows (decoding then costs what the base costs)."""
    from ..checkpoint import load_adapter as load
    from ..model.peft import merge_peft as merge

    def load_adapter(model, path):
        model = load(model, path)
        handle = getattr(model, "peft", None)
        if handle is not None and getattr(handle.cfg, "method", None) in (
            "lora", "dora", "adalora", "ia3"
        ):
            model = merge(model) or model
        return model

    return load_adapter


def build_models(cfg: ServeCommandConfig):
    """The served models: the base checkpoint's engine, then one engine per adapter."""
    import torch

    from ..checkpoint import load_shared
    from ..hardware import inference_dtype
    from ..infer.engine import InferenceEngine, engine_for
    from ..model.quant import quantize_model
    from ..serve.state import ServedModel

    adapters = parse_adapters(cfg.adapter)
    load_adapter = _adapter_loader() if adapters else None
    quantize = None if cfg.quantize == "none" else cfg.quantize
    kv_bytes = None if cfg.kv_cache_gb is None else int(cfg.kv_cache_gb * 2**30)
    base_name = cfg.model_name or Path(cfg.checkpoint).resolve().name
    if not _NAME.match(base_name):
        raise ConfigError(f"model name {base_name!r}: use letters, digits and . _ : / - (up to 128)")
    if any(n == base_name for n, _ in adapters):
        raise ConfigError(f"adapter name {base_name!r} is the base model's name")
    inference_dtype(cfg.dtype, cfg.device)  # a bad value fails before the checkpoint loads

    def adapt(model, path):
        # the adapter applied to a copy of the base sharing its unchanged tensors (merged
        # LoRA: decoding costs the same as the base), quantized like the base
        model = load_adapter(model, path)
        if quantize is not None:
            quantize_model(model, quantize)
        return model

    # the base's weights are read once, whatever the number of adapters
    base, adapter_models, ckpt = load_shared(cfg.checkpoint, [p for _, p in adapters], device=cfg.device,
                                             quantize=quantize, adapt=adapt)
    engine = engine_for(base, ckpt, device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size,
                        max_seq_len=cfg.max_seq_len, max_step_tokens=cfg.max_step_tokens, kv_cache_bytes=kv_bytes)
    template = ckpt.chat_template()
    models = [ServedModel(base_name, engine, template, source=str(engine.checkpoint))]
    dtype = next(engine.model.parameters()).dtype
    for (name, path), model in zip(adapters, adapter_models):
        if dtype != torch.float32:  # the base engine's compute dtype
            model = model.to(dtype)
        eng = InferenceEngine(model, engine.tokenizer, max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len,
                              max_step_tokens=cfg.max_step_tokens, kv_cache_bytes=kv_bytes)
        eng.checkpoint = engine.checkpoint
        models.append(ServedModel(name, eng, template, parent=base_name, source=str(path)))
    return models


def run_serve(cfg: ServeCommandConfig) -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LmforgeError(f"serving needs the 'serve' extra (pip install 'lmforge[serve]'): {e}") from None
    from ..hardware import use_threads
    from ..serve.app import create_app
    from ..serve.state import ServeConfig
    from ..serve.auth import ApiKeys
    from ..serve.logs import setup_logging
    from ..serve.server import run_server

    # ServeConfig's fields are the flags of the same names, but for these
    renamed = {"max_tokens_cap": "max_tokens", "max_concurrent": "limit_concurrency"}
    given = {"api_keys": ApiKeys.load(cfg.api_key_file, keys_given=cfg.api_key), "cors_origins": list(cfg.cors_origin),
             "trusted_proxies": list(cfg.trusted_proxies)}
    config = ServeConfig(**{f.name: given[f.name] if f.name in given else getattr(cfg, renamed.get(f.name, f.name))
                            for f in dataclasses.fields(ServeConfig)
                            if f.name in given or hasattr(cfg, renamed.get(f.name, f.name))})
    use_threads(cfg.threads)  # default: the usable cores (affinity and cgroup quota)
    models = build_models(cfg)
    app = create_app(models, config)
    setup_logging(cfg.log_level)
    if not config.api_keys.enabled and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        import logging

        logging.getLogger("lmforge.serve").warning(
            "no API keys: anyone who reaches this address can use the API",
            extra={"fields": {"event": "warning", "host": cfg.host}},
        )
    print(f"serving {', '.join(m.name for m in models)} on http://{cfg.host}:{cfg.port} "
          f"(chat page at /, API at /v1)", flush=True)
    run_server(app, host=cfg.host, port=cfg.port, drain_timeout=cfg.drain_timeout,
               log_level=cfg.log_level if cfg.log_level != "info" else "warning")
