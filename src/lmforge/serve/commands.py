"""`lmforge serve CKPT [--adapter name=path ...]`: the parser and the handler.

Kept free of heavy imports at module level: the CLI's parser imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from ..errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web chat page",
        description="Serve a checkpoint (and LoRA adapters) over an OpenAI-compatible API: "
        "/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /health, /metrics, and a chat page at /. "
        "API keys come from --api-key, --api-key-file and/or the LMFORGE_API_KEYS environment variable (comma-separated); "
        "with none, the API is open.",
    )
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the base model's name in the API (default: the checkpoint folder's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter on the base as model NAME (repeatable)")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype (auto: see `lmforge env`)")
    g.add_argument("--quantize", choices=["none", "bf16", "int8", "int4"], default="none",
                   help="quantize the weights at load")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together per model (default 16)")
    g.add_argument("--max-seq-len", type=int, default=None, help="cap on prompt + completion tokens (default: the model's context)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores, cgroup quota included)")
    g.add_argument("--max-step-tokens", type=int, default=256,
                   help="prompt tokens prefilled per engine step, between the running decodes (default 256)")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV-cache memory budget (default: what the batch could use, at most half the free memory)")
    g.add_argument("--stall-timeout", type=float, default=30.0,
                   help="seconds the engine loop may take to come round before /ready fails (default 30)")
    s = p.add_argument_group("security and limits")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="an API key clients must present (repeatable; vLLM's flag). A key on the command line is "
                   "visible to other users of the machine (ps): prefer --api-key-file or LMFORGE_API_KEYS there")
    s.add_argument("--api-key-file", default=None, help="file of API keys, one a line ('#' comments)")
    s.add_argument("--rate-limit", type=float, default=0.0, metavar="RPM", help="requests a minute per key (0: off)")
    s.add_argument("--rate-burst", type=int, default=None, help="requests at once per key (default: RPM/6)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB) -> 413")
    s.add_argument("--max-header-bytes", type=int, default=16 << 10, help="request header limit (default 16 KiB) -> 431")
    s.add_argument("--max-n", type=int, default=8, help="choices a request (default 8)")
    s.add_argument("--max-tokens", type=int, default=4096, help="cap on max_tokens (default 4096)")
    s.add_argument("--max-messages", type=int, default=512, help="messages in a chat request (default 512)")
    s.add_argument("--max-prompts", type=int, default=32, help="prompts in a /v1/completions request (default 32)")
    s.add_argument("--max-waiting", type=int, default=256, help="queued sequences before 503 (default 256)")
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may run (default 300)")
    s.add_argument("--limit-concurrency", type=int, default=512, help="requests in flight before 503 (default 512)")
    s.add_argument("--auth-fail-limit", type=float, default=10.0, metavar="N",
                   help="failed API-key attempts a minute per client address before 429 (default 10; 0: off)")
    s.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key when keys are set")
    s.add_argument("--trusted-proxies", action="append", default=[], metavar="ADDR",
                   help="believe X-Forwarded-For only from these addresses or networks (repeatable; default: none)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a whole request head (default 10) -> 408")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body has to arrive (default 30) -> 408")
    s.add_argument("--max-pending-connections", type=int, default=256,
                   help="connections without a complete request head; beyond, the oldest is closed (default 256)")
    s.add_argument("--template-timeout", type=float, default=2.0, help="seconds a chat template may render (default 2)")
    s.add_argument("--template-memory-mb", type=int, default=512,
                   help="memory a chat-template render may use (default 512)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from ORIGIN (repeatable; CORS is off by default)")
    o = p.add_argument_group("operations")
    o.add_argument("--log-requests", action="store_true", help="log request bodies (PII-masked); off by default")
    o.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    o.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on shutdown")
    return p


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


def build_models(args: argparse.Namespace):
    """The served models: the base checkpoint's engine, then one engine per adapter."""
    import torch

    from ..checkpoint import load_shared
    from ..hardware import inference_dtype
    from ..infer.engine import InferenceEngine, engine_for
    from ..model.quant import quantize_model
    from .app import ServedModel

    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise ConfigError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    adapters = parse_adapters(args.adapter)
    load_adapter = _adapter_loader() if adapters else None
    quantize = None if args.quantize == "none" else args.quantize
    if args.max_step_tokens < 1:
        raise ConfigError(f"--max-step-tokens must be at least 1, got {args.max_step_tokens}")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        raise ConfigError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    kv_bytes = None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30)
    base_name = args.model_name or Path(args.checkpoint).resolve().name
    if not _NAME.match(base_name):
        raise ConfigError(f"model name {base_name!r}: use letters, digits and . _ : / - (up to 128)")
    if any(n == base_name for n, _ in adapters):
        raise ConfigError(f"adapter name {base_name!r} is the base model's name")
    inference_dtype(args.dtype, args.device)  # a bad value fails before the checkpoint loads

    def adapt(model, path):
        # the adapter applied to a copy of the base sharing its unchanged tensors (merged
        # LoRA: decoding costs the same as the base), quantized like the base
        model = load_adapter(model, path)
        if quantize is not None:
            quantize_model(model, quantize)
        return model

    # the base's weights are read once, whatever the number of adapters
    base, adapter_models, ckpt = load_shared(args.checkpoint, [p for _, p in adapters], device=args.device,
                                             quantize=quantize, adapt=adapt)
    engine = engine_for(base, ckpt, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
                        max_seq_len=args.max_seq_len, max_step_tokens=args.max_step_tokens, kv_cache_bytes=kv_bytes)
    template = ckpt.chat_template()
    models = [ServedModel(base_name, engine, template, source=str(engine.checkpoint))]
    dtype = next(engine.model.parameters()).dtype
    for (name, path), model in zip(adapters, adapter_models):
        if dtype != torch.float32:  # the base engine's compute dtype
            model = model.to(dtype)
        eng = InferenceEngine(model, engine.tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                              max_step_tokens=args.max_step_tokens, kv_cache_bytes=kv_bytes)
        eng.checkpoint = engine.checkpoint
        models.append(ServedModel(name, eng, template, parent=base_name, source=str(path)))
    return models


def run_serve(args: argparse.Namespace) -> None:
    from .app import ServeConfig, create_app
    from .auth import ApiKeys
    from .logs import setup_logging
    from .server import run_server

    for flag in ("max_body_bytes", "max_header_bytes", "max_n", "max_tokens", "max_messages", "max_prompts",
                 "max_waiting", "limit_concurrency", "max_pending_connections", "template_memory_mb"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("request_timeout", "header_timeout", "body_timeout", "template_timeout", "stall_timeout"):
        if not getattr(args, flag) > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.drain_timeout < 0 or args.auth_fail_limit < 0:
        raise ConfigError("--drain-timeout and --auth-fail-limit must not be negative")
    proxies = _trusted_proxies(args.trusted_proxies)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    # ServeConfig's fields are the flags of the same names, but for these
    renamed = {"max_tokens_cap": "max_tokens", "max_concurrent": "limit_concurrency"}
    given = {"api_keys": ApiKeys.load(args.api_key_file, keys_given=args.api_key), "cors_origins": list(args.cors_origin),
             "trusted_proxies": proxies}
    config = ServeConfig(**{f.name: given[f.name] if f.name in given else getattr(args, renamed.get(f.name, f.name))
                            for f in dataclasses.fields(ServeConfig)
                            if f.name in given or hasattr(args, renamed.get(f.name, f.name))})
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    from ..hardware import use_threads

    use_threads(args.threads)  # default: the usable cores (affinity and cgroup quota)
    models = build_models(args)
    app = create_app(models, config)
    setup_logging(args.log_level)
    if not config.api_keys.enabled and args.host not in ("127.0.0.1", "localhost", "::1"):
        import logging

        logging.getLogger("lmforge.serve").warning(
            "no API keys: anyone who reaches this address can use the API",
            extra={"fields": {"event": "warning", "host": args.host}},
        )
    print(f"serving {', '.join(m.name for m in models)} on http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1)", flush=True)
    run_server(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
               log_level=args.log_level if args.log_level != "info" else "warning")
