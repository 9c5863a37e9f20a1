"""The server on the real SmolLM2-135M-Instruct (its own chat template, its own end-of-turn
token) through the official `openai` client: a factual answer, streamed and not."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import all_threads, needs_smol  # noqa: E402


@pytest.mark.slow
@needs_smol
def test_smollm2_chat_through_the_openai_client(smol_ckpt):
    from lmforge.infer.engine import load_engine
    from lmforge.serve.app import ServeConfig, ServedModel, create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.tokenizer.chat import ChatTemplate

    engine = load_engine(str(smol_ckpt), max_batch_size=4, quantize="int8")
    template = ChatTemplate.from_checkpoint(smol_ckpt)
    with all_threads():  # the engine loop thread takes the thread count of the app factory's thread
        app = create_app([ServedModel("smollm2", engine, template)], ServeConfig())
    srv = BackgroundServer(app).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
        answer = r.choices[0].message.content
        assert "Paris" in answer, answer
        assert "<|im_end|>" not in answer and r.usage.completion_tokens <= 24
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0,
                                                    stream=True)
            if c.choices
        )
        assert streamed == answer
        comp = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                         temperature=0, logprobs=2, echo=True)
        lp = comp.choices[0].logprobs
        assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
        assert comp.choices[0].text.startswith("The capital of France is") and "Paris" in comp.choices[0].text
    finally:
        srv.stop()
