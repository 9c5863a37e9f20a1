"""Embedded classification tasks and the other fine-tuning sets: they load, their label sets,
split disjointness; task YAML errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.examples import load_examples
from lmforge.data.tasks import list_tasks, load_task
from lmforge.errors import ConfigError
from lmforge.paths import embedded_data_dir, project_root

FT = embedded_data_dir() / "finetune"


def test_embedded_tasks_load() -> None:
    assert list_tasks() == ["sgd-chat", "sgd-domain", "sgd-next-utterance", "sgd-reply", "tinyshakespeare",
                            "topicalchat-sentiment"]
    sgd = load_task("sgd-domain")
    assert sgd.kind == "classify" and len(sgd.labels) == 15 and "Restaurants" in sgd.labels
    assert sgd.verbalizers[sgd.labels.index("RideSharing")] == "Ride sharing"
    assert "{text}" in sgd.template and sgd.prompt_kwargs()["verbalizers"] == sgd.verbalizers
    train, test = sgd.train(), sgd.test()
    for es in (train, test):  # every record is a usable example of the task's label set
        assert es.stats.rejected == {} and es.labels == sgd.labels
        assert set(e["label"] for e in es.examples) == set(sgd.labels)
    assert len(train) >= 700 and 380 <= len(test) <= 450
    assert not {e["text"] for e in train.examples} & {e["text"] for e in test.examples}

    senti = load_task("topicalchat-sentiment")
    assert senti.labels == ["Angry", "Curious to dive deeper", "Disgusted", "Fearful", "Happy", "Neutral", "Sad",
                            "Surprised"]
    train, test = senti.train(), senti.test()
    assert train.stats.rejected == test.stats.rejected == {}
    assert len(train) >= 1800 and len(test) >= 450
    assert not {e["text"] for e in train.examples} & {e["text"] for e in test.examples}
    assert load_task(sgd.path).labels == sgd.labels  # by path too


def test_embedded_evaluation_sets() -> None:
    """The next-utterance, reply, chat and perplexity tasks: every record usable, the answer
    among 4 distinct choices, each item cut from the held-out chat val dialogue of its line."""
    nu = load_task("sgd-next-utterance")
    test, pool = nu.test(), nu.train()
    assert nu.kind == "multiple_choice" and len(test) == 100 and len(pool) == 200
    assert test.stats.rejected == pool.stats.rejected == {}
    for e in test.examples + pool.examples:
        assert len(set(e["choices"])) == 4 and e["query"][-1]["role"] == "user"
    assert sorted(e["answer"] for e in test.examples) != [0] * 100  # shuffled answers
    val = [d["messages"] for d in load_examples(str(FT / "sgd_chat_val.jsonl"), "chat").examples]
    for e, dialogue in zip(test.examples, val):  # each test item cuts the held-out dialogue of its line
        n = len(e["query"])
        assert e["query"] == dialogue[:n] and dialogue[n]["content"] == e["choices"][e["answer"]]
    reply = load_task("sgd-reply").test()
    assert [r["references"][0] for r in reply.examples] == [e["choices"][e["answer"]] for e in test.examples]
    assert load_task("sgd-chat").kind == "chat" and len(load_task("sgd-chat").test()) == 100
    ppl = load_task("tinyshakespeare")
    assert ppl.kind == "perplexity" and ppl.span == (0.9, 1.0) and Path(ppl.test_path).is_file()


def test_chat_and_preference_sets_are_valid_and_disjoint() -> None:
    chat_train = load_examples(str(FT / "sgd_chat_train.jsonl"), "chat")
    chat_val = load_examples(str(FT / "sgd_chat_val.jsonl"), "chat")
    assert chat_train.stats.rejected == chat_val.stats.rejected == {}
    assert len(chat_train) == 800 and len(chat_val) == 100
    # rough token estimate: every dialogue fits SmolLM2's 2048-token context
    assert max(sum(len(m["content"]) for m in e["messages"]) for e in chat_train.examples) < 6000
    prefs = {s: load_examples(str(FT / f"sgd_preferences_{s}.jsonl"), "preference") for s in ("train", "test")}
    assert len(prefs["train"]) == 600 and len(prefs["test"]) == 150
    assert all(p.stats.rejected == {} for p in prefs.values())
    for e in prefs["train"].examples:
        assert e["prompt"][-1]["role"] == "user" and e["chosen"] != e["rejected"]
    # preference dialogues are not chat-train dialogues, and train/test pairs come from different dialogues
    chat_openings = {e["messages"][0]["content"] + e["messages"][1]["content"] for e in chat_train.examples}

    def opening(e: dict) -> str:
        return e["prompt"][0]["content"] + (e["prompt"][1]["content"] if len(e["prompt"]) > 1 else e["chosen"])

    train_open = {opening(e) for e in prefs["train"].examples}
    test_open = {opening(e) for e in prefs["test"].examples}
    assert not train_open & test_open
    assert len((train_open | test_open) & chat_openings) < 5  # only coincidentally equal openings


def test_builder_reproduces_files_and_splits_by_conversation(tmp_path: Path) -> None:
    """The builder's outputs here are exactly what build.py writes (when the source is present)."""
    src = project_root().parent / "shared" / "data"
    needed = [src / "sgd_dev_messages.jsonl", src / "sgd_test_messages.jsonl", src / "topicalchat_valid_freq.json"]
    if not all(p.is_file() for p in needed):
        pytest.skip("the shared source corpora are not on this machine")
    import importlib.util

    spec = importlib.util.spec_from_file_location("ft_build", FT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build(*needed, tmp_path)
    for name in ("sgd_domain_test.jsonl", "topicalchat_sentiment_train.jsonl", "sgd_preferences_test.jsonl"):
        assert (tmp_path / name).read_bytes() == (FT / name).read_bytes(), name
    topical = json.loads(needed[2].read_text())
    where: dict[str, set[str]] = {}
    for cid, conv in topical.items():
        for m in conv["content"]:
            where.setdefault(m["message"].strip(), set()).add(cid)
    convs = {}
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (FT / f"topicalchat_sentiment_{split}.jsonl").read_text().splitlines()]
        # the conversation of every text that occurs in only one (short texts like "lol" recur)
        convs[split] = {next(iter(where[r["text"]])) for r in rows if len(where[r["text"]]) == 1}
    assert len(convs["train"]) > 300 and len(convs["test"]) > 80
    assert not convs["train"] & convs["test"]


def test_unknown_task_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'sgd-domian' \(did you mean 'sgd-domain'\?\)"):
        load_task("sgd-domian")
    with pytest.raises(ConfigError, match="task file not found"):
        load_task(str(tmp_path / "nope.yaml"))
    base = {"kind": "classify", "train": "tr.jsonl", "test": "te.jsonl", "labels": ["a", "b"], "template": "{text}:"}
    cases = [
        ({**base, "lables": ["a"]}, "unknown field 'lables' for a classify task \\(did you mean 'labels'\\?\\)"),
        ({k: v for k, v in base.items() if k != "template"}, "missing task field\\(s\\) template"),
        ({**base, "kind": "chatt"}, "'kind' must be one of classify"),
        ({**base, "kind": "chat"}, "unknown field '(labels|template|train)' for a chat task"),
        ({"kind": "perplexity", "test": "x.txt", "span": [0.5, 0.2]}, "'span' must be"),
        ({"kind": "perplexity", "test": "x.txt", "max_length": 8, "stride": 9}, "must not exceed"),
        ({"kind": "generate", "test": "x.jsonl", "template": "no prompt"}, "must contain \\{prompt\\}"),
        ({"kind": "generate", "test": "x.jsonl", "max_tokens": 0}, "'max_tokens' must be an integer >= 1"),
        ({"kind": "multiple_choice"}, "missing task field\\(s\\) test"),
        ({**base, "labels": "a"}, "'labels' must be a non-empty list"),
        ({**base, "labels": ["a", "a"]}, "empty or repeated"),
        ({**base, "template": "no text"}, "must contain \\{text\\}"),
        ({**base, "verbalizers": {"c": "C"}}, "verbalizer for 'c'"),
    ]
    for i, (data, pattern) in enumerate(cases):
        path = tmp_path / f"t{i}.yaml"
        path.write_text(json.dumps(data))  # JSON is YAML
        with pytest.raises(ConfigError, match=pattern):
            load_task(str(path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(str(bad))


def test_user_task_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tr.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "z"}\n')
    (tmp_path / "d" / "te.csv").write_text("sentence,y\nhello,b\n")
    (tmp_path / "task.yaml").write_text(
        "kind: classify\ntrain: d/tr.jsonl\ntest: d/te.csv\nlabels: [a, b]\ntemplate: 'Q: {text}\\nA:'\n"
    )
    task = load_task(str(tmp_path / "task.yaml"))
    assert task.name == "task" and task.verbalizers == ["a", "b"]
    tr = task.train()
    assert tr.examples == [{"text": "x", "label": "a"}] and tr.stats.rejected == {"unknown_label": 1}
    task.text_field, task.label_field = "sentence", "y"
    assert task.test().examples == [{"text": "hello", "label": "b"}]
