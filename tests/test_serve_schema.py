"""The served OpenAPI schema, fuzzed by schemathesis (when installed) in a bounded run:
positive and negative cases on every operation, and no response may be a 5xx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from conftest import save_tiny_gpt  # noqa: E402

KEY = "sk-schema-0123456789"


@pytest.fixture(scope="module")
def srv(tiny_data: Path, tmp_path_factory):
    from lmforge.infer.engine import load_engine
    from lmforge.serve.app import ServeConfig, ServedModel, create_app
    from lmforge.serve.auth import ApiKeys
    from lmforge.serve.server import BackgroundServer
    from lmforge.tokenizer.chat import ChatTemplate

    ckpt = save_tiny_gpt(tiny_data, tmp_path_factory.mktemp("schema") / "model", context_length=128, n_layer=1)
    engine = load_engine(str(ckpt), max_batch_size=4)
    config = ServeConfig(api_keys=ApiKeys([KEY]), max_n=2, max_tokens_cap=16, max_messages=16, max_prompts=4,
                         request_timeout=20)
    app = create_app([ServedModel("tiny", engine, ChatTemplate.from_checkpoint(ckpt))], config)
    s = BackgroundServer(app).start()
    yield s
    s.stop()


def test_openapi_routes_have_no_5xx(srv):
    import httpx
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"} <= paths
    seen: dict[int, int] = {}
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    kwargs = case.as_transport_kwargs(base_url=srv.url)
                    r = http.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"),
                                     content=_body(kwargs), headers={"Content-Type": "application/json"})
                    seen[r.status_code] = seen.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (op.path, mode, json.dumps(case.body), r.status_code, r.text[:300])
                    if r.status_code >= 400:
                        assert "error" in r.json(), r.text[:300]

                try:
                    check()
                except hypothesis.errors.Unsatisfiable:
                    assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET", op.path
                    # no parameters to break: nothing negative to send
    assert any(200 <= s < 300 for s in seen) and any(400 <= s < 500 for s in seen), seen
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def _body(kwargs) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data") or kwargs.get("content")
    if isinstance(data, str):
        return data.encode()
    return data
