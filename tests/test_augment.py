"""Augmentation: token noise, paraphrases through an injected model, conversation operations, seeds."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.cli import main
from lmforge.commands import data as data_commands
from lmforge.data.augment import (
    AugmentConfig,
    Augmenter,
    run_augment,
    token_noise,
    truncate_context,
)
from lmforge.data.records import conversation_problem
from lmforge.errors import ConfigError

CONV = {"messages": [
    {"role": "user", "content": "how do I cook rice well"}, {"role": "assistant", "content": "rinse it first"},
    {"role": "user", "content": "and then what should I do"}, {"role": "assistant", "content": "simmer it covered"},
    {"role": "user", "content": "for how long exactly please"}, {"role": "assistant", "content": "about 15 minutes"},
], "id": "c1"}


def write(tmp_path, rows):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return src


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_token_noise_operations():
    words = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    text = " ".join(words)
    rng = random.Random(0)
    deleted = token_noise(text, rng, 0.5, 0, 0, "<mask>").split()
    assert 0 < len(deleted) < len(words) and all(w in words for w in deleted)
    swapped = token_noise(text, random.Random(1), 0, 1.0, 0, "<mask>")
    assert swapped == "b a d c f e h g j i"
    masked = token_noise("x y\nz", random.Random(0), 0, 0, 1.0, "<mask>")
    assert masked == "<mask> <mask>\n<mask>"  # lines kept
    assert token_noise("only", random.Random(0), 1.0, 0, 0, "<mask>") == "only"  # never empty


def test_truncate_context_keeps_a_valid_conversation():
    for seed in range(20):
        out = truncate_context(CONV["messages"], random.Random(seed))
        assert conversation_problem(out) is None and len(out) in (2, 4)
        assert out[-1] == CONV["messages"][-1]
    with_system = [{"role": "system", "content": "be nice"}, *CONV["messages"]]
    assert truncate_context(with_system, random.Random(0))[0]["role"] == "system"


def test_stage_is_reproducible_and_touches_only_user_turns(tmp_path):
    src = write(tmp_path, [CONV, {"text": "a plain text record with several words in it"}])
    cfg = {"inputs": [str(src)], "copies": 2, "delete_prob": 0.3, "swap_prob": 0.2, "mask_prob": 0.2,
           "truncate_prob": 0.5, "system_prob": 0.5, "system_prompts": ["You are helpful."], "seed": 7}
    a = run_augment(AugmentConfig(out=str(tmp_path / "a.jsonl"), **cfg), verbose=False)
    run_augment(AugmentConfig(out=str(tmp_path / "b.jsonl"), **cfg), verbose=False)
    run_augment(AugmentConfig(out=str(tmp_path / "c.jsonl"), **{**cfg, "seed": 8}), verbose=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    rows = read(tmp_path / "a.jsonl")
    assert rows[0] == CONV and a["stats"]["seen"] == 2 and a["written"] == len(rows)
    answers = {m["content"] for m in CONV["messages"] if m["role"] == "assistant"}
    for row in rows:
        if "messages" in row:
            assert conversation_problem(row["messages"]) is None
            assert {m["content"] for m in row["messages"] if m["role"] == "assistant"} <= answers
    assert a["counts"]["originals"] == 2 and a["counts"]["copies"] + a["counts"]["unchanged"] == 4
    copies = [row for row in rows if "augmented" in row]  # originals carry no "augmented" key
    assert len(copies) == a["counts"]["copies"] and all(row["augmented"] for row in copies)


def test_paraphrase_with_an_injected_model(tmp_path):
    src = write(tmp_path, [CONV, {"text": "first"}, {"text": "second"}])
    calls = []

    def complete(prompts):
        calls.append(len(prompts))
        out = []
        for p in prompts:
            text = p.split("Text: ", 1)[1].split("\n\nRewritten:")[0]
            out.append("" if text == "second" else f"  {text.upper()} ")
        return out

    cfg = AugmentConfig(inputs=[str(src)], out=str(tmp_path / "p.jsonl"), keep_original=False, paraphrase_batch=4)
    report = run_augment(cfg, verbose=False, complete=complete)
    rows = read(tmp_path / "p.jsonl")
    assert [m["content"] for m in rows[0]["messages"]] == [
        "HOW DO I COOK RICE WELL", "rinse it first", "AND THEN WHAT SHOULD I DO", "simmer it covered",
        "FOR HOW LONG EXACTLY PLEASE", "about 15 minutes"]
    assert rows[1] == {"text": "FIRST", "augmented": ["paraphrase"]}
    assert len(rows) == 2 and report["counts"]["paraphrase_failed"] == 1  # "second" came back empty
    assert max(calls) <= 4
    with pytest.raises(Exception, match="completions"):
        run_augment(cfg, verbose=False, complete=lambda prompts: ["x"])


def test_cli_paraphrase_model_reaches_the_stage(tmp_path, monkeypatch, capsys):
    src = write(tmp_path, [{"text": "x"}])
    seen = []
    monkeypatch.setattr(data_commands, "engine_paraphraser", lambda ckpt: seen.append(ckpt) or (lambda ps: ps))
    assert main(["data", "augment", f"inputs=[{src}]", f"out={tmp_path / 'o.jsonl'}", "--paraphrase-model", "ck"]) == 0
    assert seen == ["ck"]


def test_paraphrase_model_through_the_engine(tmp_path, tiny_checkpoint):
    src = write(tmp_path, [{"text": "To be or not"}, {"messages": CONV["messages"][:2]}])
    cfg = AugmentConfig(inputs=[str(src)], out=str(tmp_path / "o.jsonl"), paraphrase_model=str(tiny_checkpoint),
                        paraphrase_prompt="Say it again: {text}\n")
    report = data_commands.run_augment_command(cfg, data_commands.AugmentFlags())
    c = report["counts"]
    assert c["originals"] == 2 and c["copies"] + c["paraphrase_failed"] == 2
    copies = [row for row in read(tmp_path / "o.jsonl") if "augmented" in row]
    assert len(copies) == c["copies"] and all(row["augmented"] == ["paraphrase"] for row in copies)


def test_config_errors():
    for bad, match in [({"copies": -1}, "copies"), ({"delete_prob": 2.0}, "delete_prob"),
                       ({"system_prob": 0.5}, "system_prompts"), ({"noise_roles": ["bot"]}, "role"),
                       ({"keep_original": False, "copies": 0}, "nothing")]:
        with pytest.raises(ConfigError, match=match):
            AugmentConfig(inputs=["x"], **bad).validate()
    assert Augmenter(AugmentConfig(inputs=["x"])).counts["copies"] == 0
