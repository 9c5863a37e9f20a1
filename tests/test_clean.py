"""Cleaning: normalization, control characters, filters with reasons, the language filter, the stage."""

from __future__ import annotations

import builtins
import json

import pytest

from lmforge.cli import main
from lmforge.data import clean as clean_mod
from lmforge.data.clean import CleanConfig, Cleaner, run_clean
from lmforge.data.records import RecordsConfig, side_paths
from lmforge.data.reddit_synth import zst_writer
from lmforge.data.text import remove_controls, strip_markdown, unescape_html, url_only
from lmforge.errors import ConfigError, DataError


def test_normalize_unicode_controls_html_whitespace():
    c = Cleaner(CleanConfig(inputs=["-"]))
    assert c.normalize("Cafe\u0301 &amp; bar\r\n\r\n\r\n\x00next\u200b  line  \x07") == "Café & bar\n\nnext line"
    assert c.normalize("emoji 👩\u200d💻 stays") == "emoji 👩\u200d💻 stays"  # joiner kept
    nfkc = Cleaner(CleanConfig(inputs=["-"], unicode="NFKC"))
    assert nfkc.normalize("ﬁne ２") == "fine 2"
    assert remove_controls("tab\tand\nnewline") == "tab\tand\nnewline"


def test_markdown_html_and_url_helpers():
    assert strip_markdown("# Head\n> quoted **bold** and *it* ~~gone~~ [link](http://x.io) `code`\n- item") == (
        "Head\nquoted bold and it gone link code\nitem"
    )
    assert unescape_html("a &amp;gt; b") == "a > b"
    assert url_only(" https://a.com/x  www.b.org ") and url_only("[pic](https://i.imgur.com/a.jpg)")
    assert not url_only("look: https://a.com")


def test_filters_give_reasons():
    cfg = CleanConfig(inputs=["-"], min_chars=5, max_chars=200, min_words=2, min_alpha_ratio=0.5,
                      max_word_repeat=0.4, max_url_ratio=0.5)
    c = Cleaner(cfg)
    assert c.problem("") == "empty"
    assert c.problem("abc") == "too_short"
    assert c.problem("x" * 201) == "too_long"
    assert c.problem("oneword") == "too_few_words"
    assert c.problem("12345 67890 !!!") == "low_alpha"
    assert c.problem("spam " * 12) == "repetitive"
    assert c.problem("see https://example.com/a/very/long/path/indeed ok") == "url_heavy"
    assert c.problem("A perfectly normal sentence, nothing wrong with it.") is None


def test_per_turn_quality_filters_catch_one_spam_turn_in_a_long_conversation():
    human = "I watched the game last night and the second half was much better than the first one. " * 4
    spam = "FREE https://deals.example/aa https://deals.example/bb https://deals.example/cc"
    conv = {"messages": [{"role": "user", "content": human}, {"role": "assistant", "content": spam}]}
    joined = CleanConfig(inputs=["-"], max_url_ratio=0.8)
    assert Cleaner(joined).record(conv)[1] == ""  # the links are a small share of the joined text
    cleaned, reason = Cleaner(CleanConfig(inputs=["-"], max_url_ratio=0.8, per_turn=True)).record(conv)
    assert (cleaned, reason) == (None, "url_heavy")
    fine = {"messages": [{"role": "user", "content": human}, {"role": "assistant", "content": "See www.nfl.com for it."}]}
    assert Cleaner(CleanConfig(inputs=["-"], max_url_ratio=0.8, per_turn=True)).record(fine)[1] == ""


def test_language_filter_with_a_detector_and_without_one(monkeypatch):
    cfg = CleanConfig(inputs=["-"], languages=["en"], min_language_chars=5)
    fake = lambda text: "de" if "ist" in text else "en"
    c = Cleaner(cfg, detect=fake)
    assert c.problem("This is English text.") is None
    assert c.problem("Das ist ein deutscher Satz.") == "language"
    assert c.problem("ist") is None  # texts shorter than min_language_chars are not checked
    real_import = builtins.__import__

    def no_detectors(name, *args, **kwargs):
        if name.split(".")[0] in ("lingua", "langdetect"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_detectors)
    with pytest.raises(ConfigError, match="pip install langdetect"):
        clean_mod.Cleaner(cfg)
    assert clean_mod.Cleaner(CleanConfig(inputs=["-"])).problem("no language filter asked") is None


def test_stage_on_text_jsonl_and_conversations(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [
        {"text": "  Fine &amp; dandy  ", "id": 1},
        {"text": "\x00\x01"},
        {"messages": [{"role": "user", "content": "Hi\u00a0there\r\n"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\u200b"}]},
        {"messages": [{"role": "robot", "content": "?"}]},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    out = tmp_path / "sub" / "clean.jsonl"
    report = run_clean(CleanConfig(inputs=[str(src)], out=str(out), write_rejects=True), verbose=False)
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept == [{"text": "Fine & dandy", "id": 1},
                    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}]
    s = report["stats"]
    assert s == {"seen": 6, "kept": 2, "rejected": {"bad_messages": 1, "empty": 3}}
    stats_path, rejects_path = side_paths(out)
    assert stats_path.name == "clean.stats.json" and json.loads(stats_path.read_text())["stats"] == s
    assert len(rejects_path.read_text().splitlines()) == 4


def test_text_files_and_errors(tmp_path, capsys):
    src = tmp_path / "lines.txt"
    src.write_bytes(b"first line\n\nsecond  line\n\xff bad\n")
    out = tmp_path / "o.jsonl"
    report = run_clean(CleanConfig(inputs=[str(src)], out=str(out)), verbose=False)
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["first line", "second line"]
    assert report["stats"]["seen"] == 4 and report["stats"]["rejected"] == {"empty": 1, "invalid_utf8": 1}
    with pytest.raises(ConfigError, match="larger than"):
        run_clean(CleanConfig(inputs=[str(src)], min_chars=10, max_chars=2), verbose=False)
    with pytest.raises(ConfigError, match="no inputs"):
        RecordsConfig().validate()
    with pytest.raises(ConfigError, match="jsonl file"):
        run_clean(CleanConfig(inputs=[str(src)], out=str(tmp_path)), verbose=False)
    assert main(["data", "clean", f"inputs=[{tmp_path / 'missing.jsonl'}]", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err and len(err.splitlines()) == 1
    assert main(["data", "clean", "--recipe", "chat", f"inputs=[{src}]", f"out={out}"]) == 0


def test_long_window_zst_jsonl_and_a_corrupt_one(tmp_path):
    src = tmp_path / "in.jsonl.zst"
    with zst_writer(src) as f:  # a 2 GiB window, as the Pushshift dumps
        f.write(b'{"text": "compressed  text"}\n')
    out = tmp_path / "o.jsonl"
    run_clean(CleanConfig(inputs=[str(src)], out=str(out)), verbose=False)
    assert json.loads(out.read_text()) == {"text": "compressed text"}
    src.write_bytes(src.read_bytes()[:-6])  # cut inside its one record: nothing could be read
    with pytest.raises(DataError, match="truncated"):
        run_clean(CleanConfig(inputs=[str(src)], out=str(out)), verbose=False)
