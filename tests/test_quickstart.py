"""`lmforge quickstart` at tiny sizes: the Reddit dump through the data stages, a base model,
chat SFT, evaluation before and after, the report card and summary.json; then the web page,
with its default settings, talks to the quickstart's chat model (whose context is shorter than
the page's default max tokens) in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY_PRETRAIN, all_threads, launch_chromium, needs_chromium, needs_smol

from lmforge.cli import main

SFT = ["train.max_steps=3", "sft.max_length=128", "data.max_val_records=4", "train.threads=1", "log.console=false",
       "log.tensorboard=false", "train.precision=fp32"]
PRETRAIN = [o for o in TINY_PRETRAIN if not o.startswith("model.context_length")] + [
    "model.context_length=128", "train.max_steps=12", "train.eval_interval=6"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    argv = ["quickstart", "--base", "scratch", "--out", str(out), "--no-serve", "--vocab-size", "512", "--heldout", "4",
            "--data", "dump.max_conversations=120", "--data", "reddit.val_fraction=0.2",
            *[a for x in SFT for a in ("--sft", x)], *PRETRAIN]
    assert main(argv) == 0
    return out


def test_report_card_answers_is_it_any_good(scratch: Path) -> None:
    text = (scratch / "report.md").read_text()
    assert text.startswith("# lmforge quickstart: a chatbot from scratch")
    for section in ("## Is it any good?", "## Replies side by side", "## Data: every record kept or rejected",
                    "## Time", "**human reply:**", "**pretrained only:**", "**chat SFT:**"):
        assert section in text, section
    summary = json.loads((scratch / "summary.json").read_text())
    for side in ("before", "after"):
        assert {"loss", "reply_tokens_mean", "distinct_2", "identical_replies", "ended_with_eot"} <= set(summary[side])
    checks = summary["acceptance"]
    assert checks["loss_reduction"] == pytest.approx(1 - summary["after"]["loss"] / summary["before"]["loss"])
    assert checks["ended_with_eot_ok"] == (summary["after"]["ended_with_eot"] >= 0.95)
    assert summary["heldout_conversations"] == 4
    assert set(summary["seconds"]) >= {"data", "pretrain", "eval_before", "sft", "eval_after", "total_to_report"}
    assert "(pretrain/report.md)" in text and "(chat/report.md)" in text and "(eval/before/report.md)" in text


def test_report_card_counts_every_record_of_every_data_stage(scratch: Path) -> None:
    summary = json.loads((scratch / "summary.json").read_text())
    stages = summary["data"]["stages"]
    assert [s["stage"] for s in stages] == ["reddit"] * 3 + ["clean"] * 2 + ["pii"] * 2 + ["dedup"] * 2
    for row in stages:
        assert row["seen"] == row["kept"] + sum(row["rejected"].values()), row
    text = (scratch / "report.md").read_text()
    lines = [line for line in text.splitlines() if re.match(r"\| (reddit|clean|pii|dedup) \|", line)]
    assert len(lines) == len(stages)  # the same table in the card
    assert "bot" in stages[0]["rejected"] and summary["data"]["planted"]["deleted_comments"] >= 0


def test_card_config_is_what_each_stage_ran(scratch: Path) -> None:
    """The card printed `vocab_size: 8192` (the dataclass default) for a 2,048-token model: it now
    shows each run's own config."""
    text = (scratch / "report.md").read_text()
    config = yaml.safe_load(text.split("## Config")[1].split("```yaml")[1].split("```")[0])
    vocab = json.loads((scratch / "shards" / "meta.json").read_text())["vocab_size"]
    assert config["pretrain"]["model"]["vocab_size"] == vocab <= 512
    assert config["chat"]["base"] == str(scratch / "pretrain")


def test_heldout_conversations_are_cut_at_specific_replies(scratch: Path) -> None:
    held = [json.loads(line)["messages"] for line in (scratch / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 4 and all(m[-1]["role"] == "assistant" for m in held)
    train = (scratch / "data" / "dedup" / "train.jsonl").read_text()
    assert not any(json.dumps(m[-1]["content"])[1:-1] in train for m in held)  # never a stock reply of train


@needs_smol
def test_pretrained_base_is_adapted_and_compared_with_itself(smol_ckpt: Path, tmp_path: Path) -> None:
    """--base PATH (here SmolLM2, used in place): no pretraining; the base and its fine-tuned
    version (a LoRA adapter here, to keep the test short) side by side on the held-out set."""
    out = tmp_path / "smol"
    sft = ["train.max_steps=2", "sft.max_length=64", "data.max_val_records=2", "peft.method=lora", "log.console=false",
           "log.tensorboard=false"]
    argv = ["quickstart", "--base", str(smol_ckpt), "--out", str(out), "--no-serve", "--heldout", "2",
            "--reply-tokens", "8", "--data", "dump.max_conversations=60", "--data", "reddit.val_fraction=0.2",
            *[a for x in sft for a in ("--sft", x)]]
    with all_threads():
        assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"] == str(smol_ckpt) and summary["sft"]["method"] == "lora"
    assert summary["heldout_conversations"] == 2 and not (out / "pretrain").exists()
    text = (out / "report.md").read_text()
    assert text.startswith(f"# lmforge quickstart: {smol_ckpt} adapted to human conversations")
    assert "**base:**" in text and "**fine-tuned:**" in text
    config = json.loads((out / "chat" / "checkpoints").glob("step_*").__next__().joinpath("config.json").read_text())
    assert config["adapter"]["base_checkpoint"] == str(smol_ckpt.resolve())


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys) -> None:
    for argv, message in ((["--minutes", "0"], "--minutes must be positive"),
                          (["--base", str(tmp_path / "nope")], "no such file or directory"),
                          (["--base", "smollm2", "model.n_layer=2"], "refine the chat SFT with --sft"),
                          (["--data", "dumpmax=3"], "expected STAGE.KEY=VALUE"),
                          (["--heldout", "0"], "--heldout must be at least 1")):
        assert main(["quickstart", "--out", str(tmp_path / "q"), "--no-serve", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_scratch_model_is_sized_from_measured_speed(monkeypatch) -> None:
    """The shape is the largest whose predicted steps (one timed step, scaled by FLOPs per
    token) reach MIN_STEPS in the pretraining budget: a slower machine gets a smaller model."""
    import dataclasses

    import lmforge.quickstart.scratch as qs
    from lmforge.config import load_config
    from lmforge.train import pretrain as pretrain_mod
    from lmforge.train.pretrain import PretrainConfig

    pcfg = load_config(PretrainConfig, "pretrain", "quickstart", ["train.precision=fp32"])
    monkeypatch.setattr(pretrain_mod, "model_config_for_data", lambda cfg: dataclasses.replace(cfg.model, vocab_size=512))
    monkeypatch.setattr(qs, "step_seconds", lambda cfg, train, steps=3: 0.2)  # a step of the recipe's 4 x 192
    big, info = qs.choose_shape(pcfg, seconds=10_000)
    small, info_small = qs.choose_shape(pcfg, seconds=60)  # 300 steps of 4 x 192: too few
    assert big == qs.SHAPES[0] and info["measured_step_s"] == 0.2 and info["candidates"][0]["predicted_steps"] >= qs.MIN_STEPS
    assert qs.SHAPES.index(small) > qs.SHAPES.index((4, 192, 6, 2))
    assert info_small["candidates"][1] == {"shape": "4 x 192", "predicted_steps": 300}
    assert info_small["candidates"][-1]["predicted_steps"] >= qs.MIN_STEPS or small == qs.SHAPES[-1]


@needs_chromium
def test_chat_page_with_its_defaults_streams_a_reply_from_the_quickstart_model(scratch: Path, tmp_path: Path) -> None:
    """The page's default max tokens (256) was refused with a 400 by the quickstart's model
    (context 256): /v1/models now gives the context, and the page caps max_tokens to it and drops
    the oldest turns to keep the conversation inside it."""
    pytest.importorskip("fastapi")
    sync_api = pytest.importorskip("playwright.sync_api")
    import httpx

    from lmforge.infer.engine import load_engine
    from lmforge.serve.app import ServeConfig, ServedModel, create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.tokenizer.chat import ChatTemplate

    engine = load_engine(str(scratch / "chat"), max_batch_size=2)
    assert engine.max_seq_len == 128
    srv = BackgroundServer(create_app([ServedModel("quickstart-chat", engine, ChatTemplate.from_checkpoint(engine.checkpoint))],
                                      ServeConfig())).start()
    sent, statuses = [], []
    try:
        listed = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert listed["id"] == "quickstart-chat" and listed["max_model_len"] == 128
        with sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("request", lambda r: sent.append(json.loads(r.post_data))
                        if r.url.endswith("/v1/chat/completions") else None)
                page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/v1/chat/completions") else None)
                page.goto(srv.url + "/")
                page.wait_for_selector("#model option", state="attached")
                assert page.locator("#max-tokens").input_value() == "256"  # the default, untouched
                assert "128" in page.locator("#context").inner_text()
                for i, text in enumerate(["Hello! I want to find a good Italian restaurant in San Francisco.",
                                          "For 2 people at 7 pm, please. " * 4, "Thanks! What is the address?"]):
                    page.fill("#input", text)
                    page.press("#input", "Enter")  # the page disables Send until the reply is in
                    page.wait_for_function("() => !document.getElementById('send').disabled", timeout=60_000)
                    assert len(sent) == i + 1 and page.locator(".msg.assistant .meta").count() >= 1
                assert not page.locator(".msg.error").count(), page.locator(".msg.error").all_inner_texts()
                metas = page.locator(".msg.assistant .meta").all_inner_texts()
                assert "dropped the 2 oldest messages to fit the 128-token context" in metas[-1], metas
                assert not errors, errors
            finally:
                browser.close()
    finally:
        srv.stop()
    assert statuses and set(statuses) == {200}
    assert all(p["max_tokens"] <= 128 for p in sent) and sent[0]["stream"] is True
    # the third request had to drop the oldest exchange to fit the 128-token context
    assert sent[-1]["messages"][0]["content"] != "Hello! I want to find a good Italian restaurant in San Francisco."


def test_plan_gives_training_what_the_measured_stages_leave() -> None:
    from lmforge.quickstart import plan as qp

    now = [0.0]
    clock = qp.Clock(600.0, now=lambda: now[0])
    clock.total_stages = 7
    clock.stage("data")
    now[0] = 40.0
    clock.done("data")
    clock.stage("eval before")
    now[0] = 70.0
    assert clock.done("eval_before") == 30.0
    plan = qp.plan_training(clock, eval_s=30.0, scratch=False)
    reserve = 30.0 * qp.EVAL_AFTER_FACTOR + qp.REPORT_S + qp.SERVE_S + qp.MARGIN_SHARE * 600
    assert plan.reserve_s == reserve and plan.cpt_s == 0
    assert plan.sft_s == pytest.approx(600 - 70 - reserve - qp.FINETUNE_OVERHEAD_S)
    assert clock.left_for_training(plan) == pytest.approx(plan.sft_s)
    with_cpt = qp.plan_training(clock, eval_s=30.0, scratch=False, cpt_share=0.25)
    assert with_cpt.cpt_s == pytest.approx(0.25 * (with_cpt.cpt_s + with_cpt.sft_s))
    assert "chat SFT" in plan.describe() and "continued pretraining" in with_cpt.describe()
    now[0] = 590.0  # a budget already spent: training still gets a positive time, never a negative one
    assert qp.plan_training(clock, eval_s=30.0, scratch=False).sft_s == 0.0 and clock.left_for_training(plan) == 1.0
