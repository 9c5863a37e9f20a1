"""Hostile input against the server: every bad request is a 4xx with an OpenAI-style JSON
error (never a 500, never a traceback), and the server stays healthy afterwards."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import openai_error as error_of  # noqa: E402
from conftest import save_tiny_gpt  # noqa: E402

from lmforge.infer.engine import load_engine  # noqa: E402
from lmforge.serve.app import ServeConfig, ServedModel, create_app  # noqa: E402
from lmforge.serve.auth import ApiKeys, RateLimiter, bearer_token  # noqa: E402
from lmforge.serve.server import BackgroundServer  # noqa: E402
from lmforge.tokenizer.chat import ChatTemplate  # noqa: E402

KEY = "sk-hostile-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def ckpt(tiny_data: Path, tmp_path_factory) -> Path:
    return save_tiny_gpt(tiny_data, tmp_path_factory.mktemp("hostile") / "model", context_length=256)


def start(ckpt: Path, **cfg) -> BackgroundServer:
    engine = load_engine(str(ckpt), max_batch_size=4)
    models = [ServedModel("tiny", engine, ChatTemplate.from_checkpoint(engine.checkpoint))]
    config = ServeConfig(api_keys=ApiKeys(cfg.pop("keys", [KEY])), **cfg)
    return BackgroundServer(create_app(models, config)).start()


@pytest.fixture(scope="module")
def srv(ckpt):
    s = start(ckpt, max_body_bytes=1 << 20, max_header_bytes=8 << 10, max_n=4, max_tokens_cap=128, max_messages=64)
    yield s
    s.stop()


def chat(srv, body, headers=AUTH, **kw):
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=30, **kw)


def test_api_keys(srv):
    err = error_of(chat(srv, {"messages": MSG}, headers={}), 401)
    assert err["code"] == "missing_api_key" and "Bearer" in err["message"]
    assert error_of(chat(srv, {"messages": MSG}, headers={"Authorization": "Bearer sk-wrong-key-000"}), 401)["code"] == "invalid_api_key"
    assert error_of(chat(srv, {"messages": MSG}, headers={"Authorization": f"Basic {KEY}"}), 401)
    assert error_of(chat(srv, {"messages": MSG}, headers={"Authorization": f"Bearer {KEY}x"}), 401)
    assert error_of(httpx.get(srv.url + "/v1/models"), 401)
    assert error_of(httpx.post(srv.url + "/tokenize", json={"prompt": "x"}), 401)
    # unauthenticated garbage is refused before its body is even read
    assert error_of(httpx.post(srv.url + "/v1/completions", content=b"{not json"), 401)
    assert httpx.get(srv.url + "/health").status_code == 200  # public
    assert error_of(httpx.get(srv.url + "/metrics"), 401)  # behind the key unless --metrics-public
    assert httpx.get(srv.url + "/metrics", headers=AUTH).status_code == 200
    assert chat(srv, {"messages": MSG, "max_tokens": 2}).status_code == 200


def test_every_route_needs_the_key_unless_declared_public(ckpt):
    """serve/access.py declares the public paths once; every other route (and any unknown path)
    answers 401 without a key, whatever its method, and the schema marks exactly those."""
    from lmforge.serve.access import PUBLIC_PATHS
    from lmforge.serve.routes import all_routes

    srv = start(ckpt, auth_fail_limit=0)  # a server of its own: other tests' failed keys throttle 127.0.0.1
    try:
        _check_route_protection(srv, PUBLIC_PATHS, all_routes())
    finally:
        srv.stop()


def _check_route_protection(srv, public, routes) -> None:
    assert {r.path for r in routes if r.path in public} == {"/", "/health", "/ready"}
    for route in routes:
        for method in route.methods:
            r = httpx.request(method, srv.url + route.path, timeout=30)
            if route.path in public:
                assert r.status_code != 401, (method, route.path)
            else:
                assert error_of(r, 401)["code"] == "missing_api_key", (method, route.path)
    assert error_of(httpx.post(srv.url + "/v1/embeddings", json={}), 401)  # default deny
    assert httpx.get(srv.url + "/openapi.json").status_code == 200
    schema = httpx.get(srv.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for op in operations.values():
            assert ("security" in op) == (path not in public), path


def test_key_sources(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-file-key-000001\n\n  sk-file-key-000002  \n")
    keys = ApiKeys.load(str(f), env={"LMFORGE_API_KEYS": "sk-env-key-0001, sk-env-key-0002"})
    assert len(keys) == 4 and keys.check("sk-file-key-000002") == "key-1" and keys.check("sk-env-key-0002") == "key-3"
    assert keys.check("sk-file-key-00000") is None and keys.check("") is None and keys.check(None) is None
    assert not ApiKeys.load(None, env={}).enabled
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="shorter"):
        ApiKeys(["short"])
    assert bearer_token("Bearer  abc ") == "abc" and bearer_token("bearer abc") == "abc"
    assert bearer_token("Token abc") is None and bearer_token("Bearer ") is None
    given = ApiKeys.load(None, env={}, keys_given=["sk-flag-key-0001"])
    assert len(given) == 1 and given.check("sk-flag-key-0001") == "key-0"


def test_api_key_flag_and_no_prefix_matching(tmp_path, capsys):
    """`lmforge serve CKPT --api-key sk-...` (vLLM's flag) was taken by argparse's prefix
    matching as --api-key-file and failed with "API key file not found: sk-..."."""
    import argparse

    from lmforge.cli import build_parser, main

    args = build_parser().parse_args(["serve", "ckpt", "--api-key", "sk-team-key-0001", "--api-key", "sk-team-key-0002"])
    assert args.api_key == ["sk-team-key-0001", "sk-team-key-0002"] and args.api_key_file is None
    # abbreviations are refused everywhere, not silently expanded
    for argv, flag in ((["serve", "ckpt", "--api-key-f", "keys.txt"], "--api-key-f"), (["quickstart", "--no-ser"], "--no-ser")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    every = list(parsers(build_parser()))
    assert len(every) > 20 and all(not p.allow_abbrev for p in every)


def test_body_limits(srv):
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert error_of(chat(srv, big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert error_of(r, 413)


def test_bad_values_are_400(srv):
    cases = {
        "huge n": {"messages": MSG, "n": 10_000},
        "zero n": {"messages": MSG, "n": 0},
        "negative max_tokens": {"messages": MSG, "max_tokens": -5},
        "zero max_tokens": {"messages": MSG, "max_tokens": 0},
        "huge max_tokens": {"messages": MSG, "max_tokens": 10**12},
        "huge max_completion_tokens": {"messages": MSG, "max_completion_tokens": 10**30},
        "negative presence penalty": {"messages": MSG, "presence_penalty": -5},
        "negative frequency penalty": {"messages": MSG, "frequency_penalty": -2.5},
        "negative repetition penalty": {"messages": MSG, "repetition_penalty": -1},
        "negative temperature": {"messages": MSG, "temperature": -1},
        "nan temperature": {"messages": MSG, "temperature": "NaN"},
        "top_p zero": {"messages": MSG, "top_p": 0},
        "top_logprobs": {"messages": MSG, "logprobs": True, "top_logprobs": 99},
        "top_logprobs alone": {"messages": MSG, "top_logprobs": 2},
        "empty stop": {"messages": MSG, "stop": [""]},
        "many stops": {"messages": MSG, "stop": [str(i) for i in range(100)]},
        "stop token outside vocab": {"messages": MSG, "stop_token_ids": [10**6]},
        "logit bias": {"messages": MSG, "logit_bias": {"1": 5}},
        "tools": {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "image": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "no messages": {"messages": []},
        "bad role": {"messages": [{"role": "wizard", "content": "x"}]},
        "wrong type messages": {"messages": "hello"},
        "wrong type temperature": {"messages": MSG, "temperature": "hot"},
        "wrong type n": {"messages": MSG, "n": "many"},
        "wrong type content": {"messages": [{"role": "user", "content": 42}]},
        "wrong type stream": {"messages": MSG, "stream": "yes please"},
        "missing messages": {"model": "tiny"},
        "10k messages": {"messages": [{"role": "user", "content": "hi"}] * 10_000},
        "context exceeded": {"messages": [{"role": "user", "content": "word " * 300}]},
        "prompt + max_tokens over context": {"messages": MSG, "max_tokens": 250},
    }
    for name, body in cases.items():
        err = error_of(chat(srv, body), 400)
        assert err["type"] == "invalid_request_error", name
    assert "10000" in error_of(chat(srv, cases["10k messages"]), 400)["message"]
    assert "n" in error_of(chat(srv, cases["huge n"]), 400)["message"]
    assert error_of(chat(srv, cases["context exceeded"]), 400)["code"] == "context_length_exceeded"
    assert "temperature" in error_of(chat(srv, cases["wrong type temperature"]), 400)["message"]
    # a body that is not JSON, or not an object
    for raw in (b"{bad json", b"[1, 2, 3]", b"null", b"\xff\xfe", b""):
        r = httpx.post(srv.url + "/v1/chat/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert error_of(r, 400)
    r = httpx.post(srv.url + "/v1/chat/completions", content=b'{"messages": []}', headers={**AUTH, "Content-Type": "text/plain"})
    assert "Content-Type" in error_of(r, 400)["message"]


def test_completions_bad_prompts(srv):
    def comp(body):
        return httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=30)

    for body in ({"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [10**9]}, {"prompt": [-1]},
                 {"prompt": {"a": 1}}, {"prompt": ["a", 1]}, {"prompt": "x", "max_tokens": 0},
                 {"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 3}, {"prompt": ["x"] * 1000},
                 {"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, {"prompt": "x", "logprobs": 50}):
        assert error_of(comp(body), 400), body


def test_unknown_model_route_method(srv):
    err = error_of(chat(srv, {"model": "gpt-9", "messages": MSG}), 404)
    assert err["code"] == "model_not_found" and "tiny" in err["message"]
    assert error_of(httpx.get(srv.url + "/v1/nothing", headers=AUTH), 404)
    assert error_of(httpx.get(srv.url + "/v1/chat/completions", headers=AUTH), 405)


def test_oversized_headers(srv):
    r = httpx.get(srv.url + "/health", headers={"X-Junk": "a" * (32 << 10)})
    assert error_of(r, 431)["code"] == "headers_too_large"
    # past uvicorn's own bound the connection is refused outright; the server survives it
    with socket.create_connection((srv.host, srv.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (2 << 20) + b"\r\n\r\n")
        try:
            reply = s.recv(100)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    assert not reply.startswith(b"HTTP/1.1 2")
    assert httpx.get(srv.url + "/health").status_code == 200


def test_rate_limit(ckpt):
    s = start(ckpt, rate_limit=60, rate_burst=2)
    try:
        codes = [httpx.get(s.url + "/v1/models", headers=AUTH).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = httpx.get(s.url + "/v1/models", headers=AUTH)
        err = error_of(r, 429)
        assert err["type"] == "rate_limit_error" and 1 <= int(r.headers["retry-after"]) <= 2
        # buckets are per key: another key is not limited; public routes are never
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
    lim = RateLimiter(60, burst=1)
    assert lim.acquire("a", now=0.0) == 0 and lim.acquire("a", now=0.5) == pytest.approx(0.5)
    assert lim.acquire("b", now=0.5) == 0 and lim.acquire("a", now=1.0) == 0


def test_still_healthy_after_all_that(srv):
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    r = chat(srv, {"messages": MSG, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    text = httpx.get(srv.url + "/metrics", headers=AUTH).text
    assert 'status="500"' not in text
    deadline = time.monotonic() + 5
    while 'lmforge_requests_running{model="tiny"} 0.0' not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = httpx.get(srv.url + "/metrics", headers=AUTH).text
    assert 'lmforge_requests_running{model="tiny"} 0.0' in text


def test_extreme_sampling_values_do_not_break_the_batch(srv):
    """Values at the edges of the ranges (found by schemathesis) must not reach the sampler
    as inf/NaN: a failing step would fail every request batched with it."""
    for extra in ({"temperature": 1e-300}, {"temperature": 5e-324, "top_k": 1}, {"top_p": 1e-6},
                  {"repetition_penalty": 0.01}, {"temperature": 2.0, "top_p": 1e-6, "min_p": 1.0}):
        r = chat(srv, {"messages": MSG, "max_tokens": 3, **extra})
        assert r.status_code == 200, (extra, r.text)
    for extra in ({"top_p": 1e-300}, {"repetition_penalty": 1e-300}):
        assert error_of(chat(srv, {"messages": MSG, "max_tokens": 3, **extra}), 400)
