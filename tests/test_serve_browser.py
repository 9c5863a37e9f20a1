"""The web chat page in headless Chromium (Playwright driving Debian's `chromium`): a
message goes out with the page's settings, the reply streams in piece by piece, the
conversation is kept, tokens/s are shown; a screenshot is saved in the test's tmp dir.
Skipped when Playwright or a Chromium binary is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import launch_chromium, needs_chromium

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def page_server(tiny_data: Path, tmp_path_factory):
    from lmforge.infer.engine import load_engine
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.serve.app import ServeConfig, ServedModel, create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.tokenizer.chat import ChatTemplate
    from lmforge.checkpoint import save_checkpoint

    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, context_length=1024, n_layer=2, n_head=2, n_embd=32, init_std=0.2))
    # a random model that never ends its turn (so the page always gets a reply to show): the
    # final LayerNorm's output has zero mean, so with bias 3 a row of -1s scores exactly -96
    from lmforge.infer.chat import end_of_turn_ids
    from lmforge.tokenizer import Tokenizer

    stops = end_of_turn_ids(Tokenizer.from_file(tiny_data / "tokenizer.json"))
    assert stops
    with torch.no_grad():
        model.norm.bias.fill_(3.0)
        model.embed_tokens.weight[stops] = -1.0
    ckpt = save_checkpoint(tmp_path_factory.mktemp("page") / "model", model, tiny_data / "tokenizer.json")
    engine = load_engine(str(ckpt), max_batch_size=2)
    app = create_app([ServedModel("tiny", engine, ChatTemplate.from_checkpoint(ckpt))], ServeConfig())
    srv = BackgroundServer(app).start()
    yield srv
    srv.stop()


def test_chat_page_streams_a_reply(page_server, tmp_path):
    sent = []
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: sent.append(json.loads(r.post_data))
                    if r.url.endswith("/v1/chat/completions") else None)
            page.goto(page_server.url + "/")
            page.wait_for_selector("#model option", state="attached")  # (no eval: the page's CSP forbids it)
            assert page.locator("#model").input_value() == "tiny"
            page.fill("#system", "You are a playwright.")
            page.fill("#max-tokens", "120")
            page.locator("#max-tokens").dispatch_event("change")
            # count how often the reply's text changes while it streams
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver(() => { window.__updates += 1; })
                  .observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true});
            }""")
            page.fill("#input", "Speak, friend.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
            reply = page.locator(".msg.assistant .text").first.inner_text()
            meta = page.locator(".msg.assistant .meta").first.inner_text()
            assert reply.strip(), ("empty reply", meta)
            assert "tokens/s" in meta and "tokens/s" in page.locator("#status").inner_text()
            assert page.evaluate("window.__updates") > 5  # the text arrived in pieces, not at once
            # the conversation goes back with the next message, after the system prompt
            page.fill("#input", "And then?")
            page.click("#send")
            page.locator(".msg.assistant .meta").nth(1).wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 5_000
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][0]["content"] == "You are a playwright."
    assert sent[1]["messages"][2]["content"] == reply
    assert sent[0]["stream"] is True and sent[0]["max_tokens"] == 120
