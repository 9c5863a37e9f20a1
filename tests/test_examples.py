"""Fine-tuning examples: formats, normalization, every reject reason with its count and record
number, the label set, min_kept, rejects file, Hugging Face specs, the seeded split."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.examples import (
    ExampleSet,
    load_examples,
    parse_hf_spec,
    split_examples,
)
from lmforge.errors import ConfigError, DataError, LmforgeError


def _jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _conv(*turns: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"]
    msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def _accounted(es: ExampleSet) -> None:
    assert es.stats.seen == es.stats.kept + sum(es.stats.rejected.values())
    assert es.stats.kept == len(es.examples) == len(es.origins)


# ------------------------------------------------------------------------------- chat
def test_chat_formats_normalize(tmp_path: Path) -> None:
    rows = [
        {**_conv("hi", "hello", system="be brief"), "id": 7, "extra": "dropped"},
        {"messages": [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "  ", "output": "hi", "system": "sys"},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "g"}]},
        {"prompt": "Once upon", "completion": " a time"},
        {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]},
    ]
    es = load_examples(str(_jsonl(tmp_path / "train.jsonl", rows)), "chat")
    _accounted(es)
    assert es.stats.kept == 7 and es.stats.rejected == {}
    ex = es.examples
    assert ex[0] == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}]}
    assert ex[1]["messages"][0] == {"role": "user", "content": "q"}  # extra message keys dropped
    assert ex[2] == {"messages": [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}
    assert ex[3]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "Say hi"},
                                 {"role": "assistant", "content": "hi"}]
    assert [m["role"] for m in ex[4]["messages"]] == ["system", "user", "assistant"]
    assert ex[5] == {"prompt": "Once upon", "completion": " a time"}
    assert ex[6] == {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}
    assert es.origins[2][1] == 3 and es.origins[2][0].endswith("train.jsonl")
    assert es.labels is None


def test_chat_rejects_are_counted_with_record_numbers(tmp_path: Path) -> None:
    rows = [
        _conv("ok", "fine"),                                                  # 1 kept
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # 2 bad_roles
        _conv("q", "   "),                                                    # 3 empty_turn
        "{not json",                                                          # 4 bad_json
        {"foo": 1},                                                           # 5 missing_field
        [1, 2],                                                               # 6 not_an_object
        {"messages": "text"},                                                 # 7 bad_messages
        _conv("only the user"),                                               # 8 bad_roles (ends with user)
        {"prompt": "p", "completion": ""},                                    # 9 empty_turn
        {"conversations": [{"from": "alien", "value": "x"}]},                 # 10 bad_roles
        {"messages": [{"role": "robot", "content": "x"}]},                    # 11 bad_roles
        {"instruction": "do", "output": 5},                                   # 12 missing_field
    ]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    rejects = tmp_path / "rej" / "rejects.jsonl"
    es = load_examples(str(path), "chat", rejects_path=rejects)
    _accounted(es)
    assert es.stats.seen == 12 and es.stats.kept == 1
    assert es.stats.rejected == {
        "bad_roles": 4, "empty_turn": 2, "bad_json": 1, "missing_field": 2, "not_an_object": 1, "bad_messages": 1,
    }
    assert any(p.endswith("train.jsonl:2: turn 1 is 'user', expected 'assistant' (roles alternate from user)")
               for p in es.problems)
    numbers = [int(p.rsplit(".jsonl:", 1)[1].split(":")[0]) for p in es.problems]
    assert numbers == list(range(2, 13))
    assert any("train.jsonl:4: not valid JSON" in p for p in es.problems)
    assert any("train.jsonl:6: a list, not an object" in p for p in es.problems)
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [w["line"] for w in written] == list(range(2, 13))
    assert written[2]["reason"] == "bad_json" and written[2]["record"] == "{not json"


def test_blank_lines_are_skipped_but_keep_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_conv("a", "b")) + "\n\n  \n" + json.dumps({"x": 1}) + "\n")
    es = load_examples(str(path), "chat")
    assert es.stats.seen == 2 and es.origins == [(es.origins[0][0], 1)]
    assert es.problems[0].endswith("t.jsonl:4: no 'messages', 'conversations', 'instruction'/'output' or "
                                   "'prompt'/'completion' field")


def test_min_kept_error_shows_counts_and_problems(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [_conv("a", "b"), {"messages": []}, "nope"])
    with pytest.raises(DataError) as e:
        load_examples(str(path), "chat", min_kept=2)
    msg = str(e.value)
    assert "only 1 of 3 records" in msg and "need at least 2" in msg
    assert "bad_json: 1" in msg and "bad_messages: 1" in msg and "bad.jsonl:2:" in msg and "bad.jsonl:3:" in msg
    with pytest.raises(DataError, match="only 0 of 1"):
        load_examples(str(_jsonl(tmp_path / "none.jsonl", ["[]"])), "chat")


def test_json_array_gz_directory_and_max_records(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "alpaca.json").write_text(json.dumps([{"instruction": f"i{i}", "output": f"o{i}"} for i in range(3)]))
    with gzip.open(tmp_path / "d" / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps(_conv("x", "y")) + "\n")
    es = load_examples(str(tmp_path / "d"), "chat")
    assert es.stats.kept == 4 and [o[1] for o in es.origins] == [1, 2, 3, 1]
    assert load_examples(str(tmp_path / "d"), "chat", max_records=2).stats.seen == 2
    (tmp_path / "arr.data").write_text(json.dumps([{"prompt": "p", "completion": "c"}, 3]))
    forced = load_examples(str(tmp_path / "arr.data"), "chat", format="json")
    assert forced.examples == [{"prompt": "p", "completion": "c"}] and forced.stats.rejected == {"not_an_object": 1}


# -------------------------------------------------------------------------- classify
def test_classify_jsonl_labels(tmp_path: Path) -> None:
    rows = [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
        {"text": "meh", "label": 3},            # int label -> "3"
        {"text": "", "label": "pos"},           # empty_turn
        {"text": "no label"},                   # missing_field
        {"sentence": "x", "label": "pos"},      # missing_field
    ]
    path = _jsonl(tmp_path / "cls.jsonl", rows)
    es = load_examples(str(path), "classify")
    _accounted(es)
    assert es.labels == ["3", "neg", "pos"]  # sorted seen labels
    assert es.examples[2] == {"text": "meh", "label": "3"}
    assert es.stats.rejected == {"empty_turn": 1, "missing_field": 2}
    es = load_examples(str(path), "classify", labels=["pos", "neg"])
    assert es.labels == ["pos", "neg"] and es.label_ids() == [0, 1]
    assert es.stats.rejected == {"unknown_label": 1, "empty_turn": 1, "missing_field": 2}
    assert any(p.endswith("cls.jsonl:3: label '3' is not one of the task's labels") for p in es.problems)
    other = load_examples(str(_jsonl(tmp_path / "o.jsonl", [{"sentence": "s", "y": 1}])), "classify",
                          text_field="sentence", label_field="y")
    assert other.examples == [{"text": "s", "label": "1"}]
    with pytest.raises(ConfigError, match="more than once"):
        load_examples(str(path), "classify", labels=["a", "a"])
    with pytest.raises(ConfigError, match="classify"):
        load_examples(str(path), "chat", labels=["a"])


def test_classify_csv_and_parquet(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([["a, with comma", "x"], ["b\nmultiline", "y"], ["c", "z"], ["", "x"]])
    es = load_examples(str(csv_path), "classify", labels=["x", "y"])
    _accounted(es)
    assert es.examples == [{"text": "a, with comma", "label": "x"}, {"text": "b\nmultiline", "label": "y"}]
    assert es.stats.rejected == {"unknown_label": 1, "empty_turn": 1}
    assert any(p.endswith("data.csv:3: label 'z' is not one of the task's labels") for p in es.problems)
    assert any(p.endswith("data.csv:4: 'text' is empty") for p in es.problems)

    pq_path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"sentence": ["one", "two", None], "label": [0, 1, 1]}), pq_path)
    es = load_examples(str(pq_path), "classify", text_field="sentence")
    assert es.examples == [{"text": "one", "label": "0"}, {"text": "two", "label": "1"}]
    assert es.stats.rejected == {"missing_field": 1} and es.origins[1][1] == 2
    assert es.problems[0].endswith("data.parquet:3: no 'sentence' field")

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="no header row"):
        load_examples(str(tmp_path / "empty.csv"), "classify")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(str(tmp_path / "x.txt"), "classify")
    with pytest.raises(DataError, match="input not found"):
        load_examples(str(tmp_path / "missing.jsonl"), "classify")


# ------------------------------------------------------------------------ preference
def test_preference_forms_and_rejects(tmp_path: Path) -> None:
    conv = [{"role": "user", "content": "Q?"}]
    rows = [
        {"prompt": "Q?", "chosen": "yes", "rejected": "no"},                                         # 1
        {"prompt": conv, "chosen": "A", "rejected": "B"},                                            # 2
        {"chosen": conv + [{"role": "assistant", "content": "good"}],
         "rejected": conv + [{"role": "assistant", "content": "bad"}]},                              # 3 TRL implicit
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "r"}]},                                       # 4 TRL explicit
        {"prompt": "Q", "chosen": "same", "rejected": "same"},                                       # 5 identical_pair
        {"prompt": "Q", "chosen": " ", "rejected": "x"},                                             # 6 empty_turn
        {"prompt": "Q", "chosen": "x"},                                                              # 7 missing_field
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},     # 8 prompt_mismatch
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "x", "rejected": "y"},        # 9 bad_roles
    ]
    es = load_examples(str(_jsonl(tmp_path / "pref.jsonl", rows)), "preference")
    _accounted(es)
    assert es.stats.kept == 4
    assert es.stats.rejected == {"identical_pair": 1, "empty_turn": 1, "missing_field": 1, "prompt_mismatch": 1,
                                 "bad_roles": 1}
    assert es.examples[0] == {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    assert es.examples[1] == {"prompt": conv, "chosen": "A", "rejected": "B"}
    assert es.examples[2] == {"prompt": conv, "chosen": "good", "rejected": "bad"}
    assert es.examples[3] == {"prompt": conv, "chosen": "c", "rejected": "r"}
    assert any(p.endswith("pref.jsonl:5: chosen and rejected are the same text") for p in es.problems)


# ------------------------------------------------------------------- specs and errors
def test_hf_spec_parsing_and_missing_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hf_spec("hf:tatsu-lab/alpaca") == ("tatsu-lab/alpaca", None, "train")
    assert parse_hf_spec("hf:glue:sst2@validation") == ("glue", "sst2", "validation")
    assert parse_hf_spec("hf:imdb@test[:100]") == ("imdb", None, "test[:100]")
    for bad in ("hf:", "hf:name@", "hf:a:@b", "hf:a b"):
        with pytest.raises(ConfigError, match="hf:NAME"):
            parse_hf_spec(bad)
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match="needs the Hugging Face `datasets` package") as e:
        load_examples("hf:glue:sst2@train", "classify")
    assert isinstance(e.value, LmforgeError)


def test_bad_arguments(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [_conv("a", "b")])
    with pytest.raises(ConfigError, match="unknown example kind"):
        load_examples(str(path), "summarize")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown example format"):
        load_examples(str(path), "chat", format="xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no inputs"):
        load_examples([], "chat")


def test_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "a" if i % 4 else "b"} for i in range(40)]  # 30 a, 10 b
    es = load_examples(str(_jsonl(tmp_path / "c.jsonl", rows)), "classify")
    train, val = split_examples(es, 0.2, seed=1)
    assert len(val) == 8 and len(train) == 32
    assert sorted(e["label"] for e in val) == ["a"] * 6 + ["b"] * 2
    assert split_examples(es, 0.2, seed=1) == (train, val)
    assert split_examples(es, 0.2, seed=2)[1] != val
    assert {e["text"] for e in train}.isdisjoint(e["text"] for e in val)
    chat = load_examples(str(_jsonl(tmp_path / "ch.jsonl", [_conv(f"q{i}", "a") for i in range(10)])), "chat")
    tr, va = split_examples(chat, 0.1, seed=0)
    assert len(va) == 1 and len(tr) == 9
    assert split_examples(chat, 0.0, seed=0) == (chat.examples, [])
    with pytest.raises(ConfigError):
        split_examples(chat, 1.0, seed=0)
