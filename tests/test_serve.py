"""The OpenAI-compatible server on loopback: the official `openai` client, the legacy
completions format lm-evaluation-harness reads, batching, disconnects, timeouts, drain,
logging, CORS, the CLI. The model is a tiny random char-level GPT with a 1024-token
context (the shared ``tiny_checkpoint`` has 16 tokens: too few for a chat template)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import save_tiny_gpt  # noqa: E402

from lmforge.infer.engine import load_engine  # noqa: E402
from lmforge.serve.app import ServeConfig, ServedModel, create_app  # noqa: E402
from lmforge.serve.auth import ApiKeys  # noqa: E402
from lmforge.serve.server import BackgroundServer  # noqa: E402
from lmforge.tokenizer.chat import ChatTemplate  # noqa: E402

KEY = "sk-test-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session")
def chat_ckpt(tiny_data: Path, tmp_path_factory) -> Path:
    """A random 2-layer char GPT (tiny_data's vocabulary, which has the ChatML tokens), context 1024."""
    return save_tiny_gpt(tiny_data, tmp_path_factory.mktemp("serve") / "model", context_length=1024)


def make_models(ckpt: Path, name: str = "tiny", batch: int = 8, template: ChatTemplate | None = None):
    engine = load_engine(str(ckpt), max_batch_size=batch)
    return [ServedModel(name, engine, template or ChatTemplate.from_checkpoint(engine.checkpoint))]


def serve(ckpt: Path, **cfg):
    keys = cfg.pop("keys", [KEY])
    models = cfg.pop("models", None) or make_models(ckpt, batch=cfg.pop("batch", 8))
    app = create_app(models, ServeConfig(api_keys=ApiKeys(keys), **cfg))
    return BackgroundServer(app).start(), app


@pytest.fixture(scope="module")
def server(chat_ckpt):
    srv, app = serve(chat_ckpt)
    srv.app = app
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, headers=HEADERS, **kw):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", headers=HEADERS, timeout=10).text
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
                found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


# ---- the official client ---------------------------------------------------------------------
def test_openai_client_chat_streamed_equals_whole(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, seed=7, temperature=0.9)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.id.startswith("chatcmpl-") and whole.model == "tiny"

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, seed=7, temperature=0.9,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    # same seed: the streamed reply is the whole reply, in pieces
    assert "".join(pieces) == choice.message.content
    assert reasons == [choice.finish_reason]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_openai_client_completions_streamed_and_whole(client):
    whole = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=3, temperature=0.8)
    c = whole.choices[0]
    assert c.finish_reason in ("stop", "length") and whole.usage.prompt_tokens == len("ROMEO:")
    text = "".join(
        ch.choices[0].text
        for ch in client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=3, temperature=0.8,
                                            stream=True)
        if ch.choices
    )
    assert text == c.text
    # n choices, seeded: reproducible, and not all alike
    a = client.completions.create(model="tiny", prompt="KING:", max_tokens=16, n=3, seed=11,
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model="tiny", prompt="KING:", max_tokens=16, n=3, seed=11,
                                  extra_body={"ignore_eos": True})
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1
    assert a.usage.completion_tokens == 48 and a.usage.prompt_tokens == len("KING:")


def test_greedy_matches_the_engine_and_stop_strings_cut(client, chat_ckpt):
    engine = load_engine(str(chat_ckpt), max_batch_size=1)
    from lmforge.infer.sampling import SamplingParams

    want = engine.generate(["First Citizen:"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].text
    got = client.completions.create(model="tiny", prompt="First Citizen:", max_tokens=30, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want
    stop = want[10:12]
    cut = client.completions.create(model="tiny", prompt="First Citizen:", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == want[: want.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens >= 1
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the top token
        assert bytes(entry.bytes).decode("utf-8") == entry.token


def test_completions_echo_logprobs_are_the_models(server, chat_ckpt):
    """The legacy format lm-evaluation-harness's local-completions reads (loglikelihood)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.checkpoint import load_model

    tok = Tokenizer.from_file(chat_ckpt / "tokenizer.json")
    context, continuation = "ROMEO: ", "Good"
    ids = tok.encode(context + continuation)
    body = {"model": "tiny", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
            "seed": 1234}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert "".join(lp["tokens"][: len(ids)]) == context + continuation
    model, _ = load_model(chat_ckpt)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
    # what lm-eval computes: the continuation's log-likelihood and whether it is greedy
    ctxlen = len(tok.encode(context))
    ll = sum(lp["token_logprobs"][ctxlen:-1])
    assert ll == pytest.approx(sum(want[ctxlen - 1 :]), abs=1e-3)
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]))
    assert greedy == all(logp[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
    # text prompts in a batch, and max_tokens=0 (score the prompt only)
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": ["ROMEO:", "JULIET:"], "max_tokens": 0,
                                         "echo": True, "logprobs": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["text"] for c in out["choices"]] == ["ROMEO:", "JULIET:"]
    assert out["usage"] == {"prompt_tokens": 13, "completion_tokens": 0, "total_tokens": 13}
    assert [len(c["logprobs"]["tokens"]) for c in out["choices"]] == [6, 7]


def test_models_tokenize_detokenize_openapi(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = post(server, "/tokenize", {"prompt": "ROMEO:"})
    assert r.status_code == 200 and r.json()["count"] == 6
    back = post(server, "/detokenize", {"tokens": r.json()["tokens"]})
    assert back.json()["prompt"] == "ROMEO:"
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 6 and chat["max_model_len"] == 1024
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/health"):
        assert path in schema["paths"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "lmforge chat" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing from a CDN
    assert "Content-Security-Policy" in page.headers


# ---- batching, disconnects, timeouts, drain -------------------------------------------------------
def test_concurrent_requests_are_batched_and_unchanged_by_it(server, client):
    sched = server.app.state.scheduler
    before = sched.stats["multi_row_steps"]
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "KING", "QUEEN")]

    def one(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=300, seed=5, temperature=1.0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, prompts))
    assert sched.stats["multi_row_steps"] > before  # rows of different requests decoded in one step
    assert sched.stats["max_decode_rows"] >= 2
    batched = metric(server, "lmforge_decode_batch_rows_count") - metric(server, "lmforge_decode_batch_rows_bucket",
                                                                            'le="1.0"')
    assert batched > 0
    alone = [one(p) for p in prompts]  # one at a time: the same text (per-request seeded generators)
    assert together == alone


def test_disconnected_stream_frees_its_slot(server):
    aborted = metric(server, "lmforge_requests_aborted_total")
    generated = metric(server, "lmforge_generation_tokens_total")
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=HEADERS, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 10
    while metric(server, "lmforge_requests_aborted_total") == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server, "lmforge_requests_aborted_total") == aborted + 1
    assert metric(server, "lmforge_requests_running") == 0
    time.sleep(0.2)
    assert metric(server, "lmforge_generation_tokens_total") - generated < 1000  # it stopped early
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_request_timeout(chat_ckpt):
    srv, _ = serve(chat_ckpt, request_timeout=0.15)
    try:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True}
        r = post(srv, "/v1/completions", body)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, headers=HEADERS) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "timeout" in events[-2]
        deadline = time.monotonic() + 5
        while metric(srv, "lmforge_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(srv, "lmforge_requests_running") == 0
    finally:
        srv.stop()


def test_graceful_shutdown_drains_streams(chat_ckpt):
    srv, _ = serve(chat_ckpt)
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 600, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    stopper = None
    events = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=HEADERS, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if stopper is None:  # shut down while the reply streams
                    stopper = threading.Thread(target=srv.stop)
                    stopper.start()
    stopper.join(30)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == 600  # the in-flight reply finished
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/health", timeout=2)


def test_scheduler_deadline_aborts_without_a_handler(chat_ckpt):
    """The loop enforces the deadline itself (a handler may be gone): the row is freed."""
    import asyncio

    from lmforge.infer.sampling import SamplingParams
    from lmforge.serve.scheduler import Scheduler, TimedOut

    engine = load_engine(str(chat_ckpt), max_batch_size=2)
    sched = Scheduler({"m": engine})
    sched.start()

    async def go():
        q = asyncio.Queue()
        params = SamplingParams(max_tokens=1000, ignore_eos=True)
        sched.submit("m", [[1, 2, 3]], [params], asyncio.get_running_loop(), q, timeout=0.05)
        while True:
            ev = await q.get()
            if ev.kind != "delta":
                return ev

    try:
        ev = asyncio.run(go())
        assert ev.kind == "error" and isinstance(ev.error, TimedOut)
        deadline = time.monotonic() + 5
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_unfinished() and sched.stats["aborted"] == 1
    finally:
        sched.stop()


def test_engine_failure_is_a_500_and_the_loop_survives(server, monkeypatch):
    engine = server.app.state.scheduler.engines["tiny"]
    real = engine.step
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real()

    monkeypatch.setattr(engine, "step", broken)
    r = post(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "simulated" not in r.text  # internals are logged, not sent
    monkeypatch.setattr(engine, "step", real)
    assert post(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 4}).status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---- operations: request ids, logs, CORS, metrics -------------------------------------------------
def test_request_ids_and_metrics(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
             headers={**HEADERS, "X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "chatcmpl-abc-123"
    other = post(server, "/v1/models", None, headers={**HEADERS, "X-Request-Id": "bad id with spaces!"})
    assert re.fullmatch(r"[0-9a-f]{32}", other.headers["x-request-id"])
    assert httpx.get(server.url + "/metrics").status_code == 401  # keys are set: metrics need one too
    text = httpx.get(server.url + "/metrics", headers=HEADERS).text
    for name in ("lmforge_requests_running", "lmforge_requests_waiting", "lmforge_prompt_tokens_total",
                 "lmforge_generation_tokens_total", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_inter_token_latency_seconds_bucket", "lmforge_e2e_request_latency_seconds_bucket",
                 'lmforge_http_requests_total{method="POST",path="/v1/chat/completions",status="200"}'):
        assert name in text, name


def test_bodies_are_not_logged_by_default_and_masked_when_on(chat_ckpt, server, caplog):
    secret = "write to jane.doe@example.com or call +1 415 555 0100"
    caplog.set_level(logging.INFO, logger="lmforge.serve")
    post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": secret}], "max_tokens": 1})
    assert "jane.doe" not in caplog.text and "request_body" not in caplog.text
    assert '"event": "completion"' in caplog.text or any(
        getattr(r, "fields", {}).get("event") == "completion" for r in caplog.records
    )
    srv, _ = serve(chat_ckpt, log_requests=True)
    try:
        caplog.clear()
        post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": secret}], "max_tokens": 1})
        bodies = [r.fields["body"] for r in caplog.records if getattr(r, "fields", {}).get("event") == "request_body"]
        assert bodies and "<EMAIL>" in json.dumps(bodies) and "<PHONE>" in json.dumps(bodies)
        assert "jane.doe" not in json.dumps(bodies) and "555 0100" not in json.dumps(bodies)
        assert KEY not in caplog.text
    finally:
        srv.stop()


def test_cors_off_by_default_and_on_by_flag(server, chat_ckpt):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    srv, _ = serve(chat_ckpt, cors_origins=["https://app.example"])
    try:
        ok = httpx.options(srv.url + "/v1/chat/completions",
                           headers={**pre, "Origin": "https://app.example", "Access-Control-Request-Headers": "authorization"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        bad = httpx.options(srv.url + "/v1/chat/completions", headers=pre)
        assert "access-control-allow-origin" not in bad.headers
    finally:
        srv.stop()


def test_chat_template_is_sandboxed(chat_ckpt):
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    srv, _ = serve(chat_ckpt, models=make_models(chat_ckpt, template=evil))
    try:
        r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 400 and "unsafe" in r.json()["error"]["message"]
    finally:
        srv.stop()


# ---- adapters and the command line ---------------------------------------------------------
def test_adapter_is_served_as_its_own_model(chat_ckpt, tmp_path):
    peft = pytest.importorskip("lmforge.model.peft")
    io = pytest.importorskip("lmforge.checkpoint.adapters")
    from lmforge.checkpoint import load_model
    from lmforge.commands.serve import ServeCommandConfig, build_models

    model, _ = load_model(chat_ckpt)
    peft.apply_peft(model, peft.PeftConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # a trained-looking adapter: not the identity
    out = tmp_path / "adapter"
    out.mkdir()
    io.save_adapter(out, model, base_checkpoint=str(chat_ckpt))
    cfg = ServeCommandConfig(checkpoint=str(chat_ckpt), adapter=[f"shakespeare={out}"], model_name="base",
                             max_batch_size=2)
    models = build_models(cfg)
    assert [m.name for m in models] == ["base", "shakespeare"] and models[1].parent == "base"
    srv = BackgroundServer(create_app(models, ServeConfig())).start()
    try:
        listed = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("base", None), ("shakespeare", "base")]
        texts = {}
        for name in ("base", "shakespeare"):
            r = httpx.post(srv.url + "/v1/completions", json={"model": name, "prompt": "ROMEO:", "max_tokens": 20,
                                                              "temperature": 0, "ignore_eos": True})
            texts[name] = r.json()["choices"][0]["text"]
        assert texts["base"] != texts["shakespeare"]
    finally:
        srv.stop()


def test_cli_errors_are_one_line(chat_ckpt, tmp_path, capsys):
    from lmforge.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["serve", str(chat_ckpt), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", str(chat_ckpt), "--adapter", f"x={tmp_path / 'nope'}"]) == 2
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys\n")
    assert main(["serve", str(chat_ckpt), "--api-key-file", str(empty)]) == 2
    assert "holds no keys" in capsys.readouterr().err
    assert main(["serve", str(chat_ckpt), "--max-n", "0"]) == 2
    assert "--max-n" in capsys.readouterr().err


def test_ctrl_c_stops_the_foreground_server_cleanly(chat_ckpt, tmp_path):
    """`lmforge serve` in its own process: SIGINT drains, exits 0, and logs no traceback."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(chat_ckpt), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert '"msg": "stopped"' in out and "Traceback" not in out, out
