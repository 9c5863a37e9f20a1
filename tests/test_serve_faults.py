"""The audit's server cases (issue 17), each as a test: long prompts and deadlines, lone
surrogates, slowloris, hostile chat templates, non-finite outputs, a stalled loop, failed
logins, X-Forwarded-For, /metrics, strict types, echoed names, the protocol's own errors.
Every answer is OpenAI-shaped JSON (4xx, or 200 with a replaced character), never a 500,
and /health keeps answering. Timing bounds here are generous (a loaded CI machine); the
tight figures are measured by benchmarks/serve_limits.py (RELIABILITY.md)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import openai_error as error_of  # noqa: E402
from conftest import save_tiny_gpt  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.infer.engine import load_engine  # noqa: E402
from lmforge.serve.app import ServeConfig, ServedModel, create_app  # noqa: E402
from lmforge.serve.auth import ApiKeys  # noqa: E402
from lmforge.serve.server import BackgroundServer  # noqa: E402
from lmforge.tokenizer.chat import ChatTemplate  # noqa: E402

KEY = "sk-faults-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def ckpt(tiny_data: Path, tmp_path_factory) -> Path:
    return save_tiny_gpt(tiny_data, tmp_path_factory.mktemp("faults") / "model", context_length=512)


def start(ckpt: Path, template: ChatTemplate | None = None, engine=None, batch: int = 4, **cfg) -> BackgroundServer:
    engine = engine or load_engine(str(ckpt), max_batch_size=batch, max_step_tokens=cfg.pop("step_tokens", 256))
    models = [ServedModel("tiny", engine, template or ChatTemplate.from_checkpoint(engine.checkpoint))]
    config = ServeConfig(api_keys=ApiKeys(cfg.pop("keys", [KEY])), **cfg)
    srv = BackgroundServer(create_app(models, config)).start()
    srv.engine = engine
    return srv


@pytest.fixture(scope="module")
def srv(ckpt):
    s = start(ckpt, header_timeout=1.0, body_timeout=1.0)
    yield s
    s.stop()


def raw_error(reply: bytes, status: int) -> dict:
    """The JSON error of a raw HTTP reply read from a socket."""
    import json

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), head[:80]
    assert b"application/json" in head.lower()
    return json.loads(body)["error"]


def _health_poller():
    """benchmarks/serve_limits.py's HealthPoller: /health polled at 20 Hz from a thread."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_limits.py"
    spec = importlib.util.spec_from_file_location("serve_limits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HealthPoller


HealthWatch = _health_poller()


# ---- text ----------------------------------------------------------------------------------
def test_lone_surrogates_become_replacement_characters(srv):
    """A lone surrogate in any string is U+FFFD: 200, and the keep-alive connection survives."""
    with httpx.Client(base_url=srv.url, headers={**AUTH, "Content-Type": "application/json"}, timeout=60) as c:
        r = c.post("/v1/chat/completions", content=b'{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":2}')
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", content=b'{"prompt":"\\udbff","max_tokens":2,"echo":true}')
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\ufffd"), r.text
        r = c.post("/tokenize", content=b'{"prompt":"x\\udc00"}')
        assert r.status_code == 200 and r.json()["count"] >= 1
        r = c.post("/v1/chat/completions", content=b'{"model":"\\ud800","messages":[{"role":"user","content":"x"}]}')
        assert error_of(r, 404)["code"] == "model_not_found"
        r = c.post("/v1/completions", content=b'{"prompt":"ok","max_tokens":1,"stop":["\\ud800"]}')
        assert r.status_code == 200


def test_strict_types_and_short_echoes(srv):
    def chat(body):
        return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)

    for bad in ({"n": "2"}, {"stream": "yes"}, {"max_tokens": 2.0}, {"temperature": "0.5"}, {"seed": "1"},
                {"logprobs": 1}, {"stream": 1}):
        err = error_of(chat({"messages": MSG, **bad}), 400)
        assert next(iter(bad)) in err["message"], (bad, err)
    assert chat({"messages": MSG, "temperature": 1, "max_tokens": 2}).status_code == 200  # an integer is a number
    r = chat({"model": "m" * 100_000, "messages": MSG})
    assert len(r.content) < 1000 and error_of(r, 400)
    r = httpx.get(srv.url + "/" + "p" * 5000, headers=AUTH)
    assert len(r.content) < 1000 and error_of(r, 404)


def test_deeply_nested_json_body_is_a_400(srv):
    body = b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    error_of(r, 400)
    assert httpx.get(srv.url + "/health").status_code == 200


# ---- the HTTP layer ----------------------------------------------------------------------------
def test_the_protocols_own_errors_are_json(srv):
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert raw_error(s.recv(4096), 400)["code"] == "bad_request"
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (2 << 20) + b"\r\n\r\n")
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert raw_error(reply, 431)["code"] == "headers_too_large"


def test_slow_heads_and_bodies_time_out(srv):
    """A head trickled past header_timeout gets 408 and is closed; so does a body past body_timeout."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for _ in range(4):  # bytes keep coming: an idle timer would never fire
            time.sleep(0.3)
            try:
                s.sendall(b"X-A: b\r\n")
            except OSError:
                break
        assert raw_error(s.recv(4096), 408)["code"] == "header_timeout"
        assert time.monotonic() - t0 < 5
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        assert raw_error(s.recv(4096), 408)["code"] == "body_timeout"


def test_slowloris_does_not_lock_out_a_client(ckpt):
    """520 connections holding half a request head: a client that sends a whole request is
    still answered (the oldest pending connections are closed to make room)."""
    s = start(ckpt, max_pending_connections=64, header_timeout=60)
    socks = []
    try:
        for _ in range(520):
            c = socket.create_connection((s.host, s.port), timeout=10)
            c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(c)
        t0 = time.monotonic()
        r = httpx.get(s.url + "/v1/models", headers=AUTH, timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 < 10
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2}, headers=AUTH, timeout=30)
        assert r.status_code == 200
    finally:
        for c in socks:
            c.close()
        s.stop()


def test_requests_in_flight_are_capped_but_probes_answer(ckpt):
    s = start(ckpt, max_concurrent=1, body_timeout=1.5)
    try:
        with socket.create_connection((s.host, s.port), timeout=10) as held:  # in flight: its body never comes
            held.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Length: 50\r\n\r\n{")
            time.sleep(0.3)
            err = error_of(httpx.get(s.url + "/v1/models", headers=AUTH), 503)
            assert err["code"] == "overloaded"
            assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/ready").status_code == 200
        time.sleep(2.0)
        assert httpx.get(s.url + "/v1/models", headers=AUTH).status_code == 200
    finally:
        s.stop()


# ---- auth, proxies, metrics --------------------------------------------------------------------
def test_failed_logins_are_throttled_per_address(ckpt):
    s = start(ckpt, auth_fail_limit=5)
    try:
        bad = {"Authorization": "Bearer sk-wrong-key-0000"}
        codes = [httpx.get(s.url + "/v1/models", headers=bad).status_code for _ in range(8)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3
        r = httpx.get(s.url + "/v1/models", headers=AUTH)  # even the right key waits: guessing gains nothing
        err = error_of(r, 429)
        assert err["code"] == "auth_throttled" and int(r.headers["retry-after"]) >= 1
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_forwarded_for_is_believed_only_from_trusted_proxies(ckpt):
    """Without keys the rate limit is per address; a rotating X-Forwarded-For from an
    untrusted peer does not make new addresses."""
    s = start(ckpt, keys=[], rate_limit=60, rate_burst=2)
    try:
        codes = [httpx.get(s.url + "/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(4)]
        assert codes == [200, 200, 429, 429]
    finally:
        s.stop()
    s = start(ckpt, keys=[], rate_limit=60, rate_burst=2, trusted_proxies=["127.0.0.1"])
    try:
        codes = [httpx.get(s.url + "/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(4)]
        assert codes == [200] * 4  # behind a trusted proxy each forwarded client has its own bucket
    finally:
        s.stop()


def test_metrics_behind_the_key_unless_public(ckpt, srv):
    error_of(httpx.get(srv.url + "/metrics"), 401)
    assert "lmforge_requests_running" in httpx.get(srv.url + "/metrics", headers=AUTH).text
    s = start(ckpt, metrics_public=True)
    try:
        assert httpx.get(s.url + "/metrics").status_code == 200
    finally:
        s.stop()


# ---- bounded work: long prompts, deadlines, n ----------------------------------------------------
def slow_forward(engine, seconds: float):
    """Make every forward of ``engine``'s model take at least ``seconds`` (a big model on a slow CPU)."""
    model = engine.model
    real = model.forward_cached

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    model.forward_cached = slow


def test_a_request_past_its_deadline_stops_computing(ckpt):
    """A 400-token prompt prefilled 8 tokens a step (each forward 20 ms): with a 0.5 s timeout
    the client gets 504, and no prompt token of it (nor of its n=4 siblings) is computed after."""
    engine = load_engine(str(ckpt), max_batch_size=4, max_step_tokens=8)
    slow_forward(engine, 0.02)
    s = start(ckpt, engine=engine, request_timeout=0.5)
    try:
        with HealthWatch(s.url) as watch:
            prompt = "ab " * 133
            r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 4},
                           headers=AUTH, timeout=60)
            assert error_of(r, 504)["type"] == "timeout_error"
            time.sleep(0.3)
            done = engine.stats["prompt_tokens"]
            time.sleep(0.5)
            assert engine.stats["prompt_tokens"] == done and not engine.has_unfinished()
            assert done < 4 * 400
        assert watch.failed == 0 and watch.worst < 5
    finally:
        s.stop()


def test_a_long_prompt_does_not_stall_a_stream(ckpt):
    """While a 400-token prompt prefills (8 tokens a step, 20 ms a forward), a stream started
    before it keeps receiving tokens: no gap longer than a few steps."""
    engine = load_engine(str(ckpt), max_batch_size=4, max_step_tokens=8)
    slow_forward(engine, 0.02)
    s = start(ckpt, engine=engine)
    try:
        gaps = []

        def stream():
            body = {"prompt": "ROMEO:", "max_tokens": 60, "stream": True, "ignore_eos": True, "temperature": 0}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                last = None
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.2)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "ab " * 133, "max_tokens": 2}, headers=AUTH,
                       timeout=60)
        t.join()
        assert r.status_code == 200 and len(gaps) >= 50
        assert max(gaps) < 2.0  # a whole prefill in one step would be ~50 forwards, 1 s+ at 20 ms each
        assert engine.stats["prefill_chunks"] >= 400 // 8
    finally:
        s.stop()


# ---- model faults: non-finite outputs, a stalled loop ------------------------------------------
def test_non_finite_outputs_are_503_and_not_ready(ckpt):
    engine = load_engine(str(ckpt), max_batch_size=2)
    with torch.no_grad():
        engine.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
    s = start(ckpt, engine=engine)
    try:
        assert httpx.get(s.url + "/ready").status_code == 200
        err = error_of(httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3},
                                  headers=AUTH, timeout=30), 503)
        assert err["code"] == "model_output_invalid"
        assert error_of(httpx.get(s.url + "/ready"), 503)["code"] == "not_ready"
        assert httpx.get(s.url + "/health").status_code == 200  # alive, not ready
        err = error_of(httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, headers=AUTH), 503)
        assert err["code"] == "model_output_invalid"
    finally:
        s.stop()


def test_a_stalled_loop_is_not_ready(ckpt):
    engine = load_engine(str(ckpt), max_batch_size=2)
    s = start(ckpt, engine=engine, stall_timeout=0.3)
    real = engine.step
    try:
        engine.step = lambda: (time.sleep(1.5), real())[1]  # one step that takes far too long
        t = threading.Thread(target=httpx.post, args=(s.url + "/v1/completions",),
                             kwargs={"json": {"prompt": "x", "max_tokens": 1}, "headers": AUTH, "timeout": 30})
        t.start()
        time.sleep(0.8)
        assert error_of(httpx.get(s.url + "/ready"), 503)["code"] == "not_ready"
        assert httpx.get(s.url + "/health").status_code == 200
        engine.step = real
        t.join()
        time.sleep(0.5)
        assert httpx.get(s.url + "/ready").status_code == 200
    finally:
        engine.step = real
        s.stop()


# ---- hostile chat templates --------------------------------------------------------------------
HOSTILE_TEMPLATES = {
    "power": "{{ 10**10000000 }}",
    "repeat": "{{ 'x' * 200000000 }}",
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                "{{ ns.s|length }}",
    "hoard": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['x' * 4000000] %}"
             "{% endfor %}{{ ns.l|length }}",
    "center": "{{ 'x'.center(10**9) }}",
    "zero division": "{{ 1 / 0 }}",
    "overflow": "{{ 2.0 ** 100000 }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "type error": "{{ messages[0]['content'] + 1 }}",
    "raise": "{{ raise_exception('no system prompt allowed') }}",
    "escape": "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
}


def test_hostile_templates_are_400s_within_their_bound(ckpt):
    """Each template served as its own model: every render ends within its bound (1 s, 256 MB)
    as a 400 naming the template, /health answers throughout, and the next request is served."""
    models = [ServedModel(name.replace(" ", "-"), load_engine(str(ckpt), max_batch_size=1), ChatTemplate(source))
              for name, source in HOSTILE_TEMPLATES.items()]
    models.append(ServedModel("good", load_engine(str(ckpt), max_batch_size=1), ChatTemplate()))
    config = ServeConfig(api_keys=ApiKeys([KEY]), template_timeout=1.0, template_memory_mb=256)
    s = BackgroundServer(create_app(models, config)).start()
    try:
        with HealthWatch(s.url) as watch:
            for name in HOSTILE_TEMPLATES:
                model = name.replace(" ", "-")
                t0 = time.monotonic()
                r = httpx.post(s.url + "/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 2},
                               headers=AUTH, timeout=60)
                took = time.monotonic() - t0
                err = error_of(r, 400)
                assert err["code"] == "template_error" and "template" in err["message"], (name, err)
                assert took < 10, (name, took)
                error_of(httpx.post(s.url + "/tokenize", json={"model": model, "messages": MSG}, headers=AUTH,
                                    timeout=60), 400)
            r = httpx.post(s.url + "/v1/chat/completions", json={"model": "good", "messages": MSG, "max_tokens": 2},
                           headers=AUTH, timeout=60)
            assert r.status_code == 200
        assert watch.failed == 0 and watch.worst < 5, watch.worst
    finally:
        s.stop()


# ---- limits checked at start ---------------------------------------------------------------------
def test_absurd_serve_settings_are_one_line_errors(ckpt, capsys):
    for args in (["--max-batch-size", "10000000"], ["--max-seq-len", "1"], ["--trusted-proxies", "not-an-ip"],
                 ["--header-timeout", "0"], ["--kv-cache-gb", "0.000001"]):
        assert main(["serve", str(ckpt), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (args, err)
