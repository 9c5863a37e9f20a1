"""The Reddit pipeline: synthetic Pushshift dumps -> conversations, hand-checked on small trees."""

from __future__ import annotations

import io
import json
from pathlib import Path

import orjson
import pytest
import zstandard
from conftest import save_tiny_llama

from lmforge.cli import main
from lmforge.data.conversations import (
    Comment,
    ExtractOptions,
    Submission,
    extract_thread,
)
from lmforge.data.records import conversation_problem
from lmforge.data.reddit import RedditConfig, run_reddit
from lmforge.data.reddit_synth import SynthRedditConfig, synth_reddit, zst_writer
from lmforge.errors import ConfigError, DataError

SHARED_SGD = Path(__file__).resolve().parents[2] / "shared" / "data" / "sgd_dev_messages.jsonl"


def write_ndjson(path: Path, rows: list, zst: bool = False) -> Path:
    data = b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)
    if zst:
        with zst_writer(path) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def comment(cid, parent, body, author, link="s1", score=5, created=None, sub="test"):
    return {"id": cid, "parent_id": parent, "link_id": f"t3_{link}", "body": body, "author": author,
            "score": score, "subreddit": sub, "created_utc": created if created is not None else int(cid[1:]) + 100}


# A thread with a submission, nesting, a same-author continuation, a bot, a deleted comment and
# an orphan (a reply to the deleted comment). Ids c<N> are in time order.
TREE = [
    {"id": "s1", "title": "Title", "selftext": "Body", "author": "op", "subreddit": "test", "score": 3,
     "created_utc": 1},
    comment("c1", "t3_s1", "A1", "alice"),
    comment("c2", "t1_c1", "B1", "bob"),
    comment("c3", "t1_c2", "A2", "alice"),
    comment("c4", "t1_c1", "C1", "carol"),
    comment("c5", "t3_s1", "D1", "dave"),
    comment("c6", "t1_c5", "I am a bot.", "AutoModerator"),
    comment("c7", "t1_c5", "[deleted]", "[deleted]"),
    comment("c8", "t1_c7", "E1", "erin"),
    comment("c9", "t1_c3", "A3", "alice"),
]


def run_tree(tmp_path: Path, rows=TREE, name="tree.ndjson", **settings) -> tuple[dict, list[dict]]:
    src = write_ndjson(tmp_path / name, rows)
    settings = {"val_fraction": 0.0, "num_proc": 1, "partitions": 2, **settings}
    report = run_reddit(RedditConfig(inputs=[str(src)], out=str(tmp_path / "out"), **settings), verbose=False)
    return report, read_jsonl(tmp_path / "out" / "train.jsonl")


def turns(conv: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in conv["messages"]]


def test_paths_of_a_small_tree_match_hand_checked_conversations(tmp_path):
    report, convs = run_tree(tmp_path)
    assert [turns(c) for c in convs] == [
        # s1 > c1 > c2 > c3+c9 (alice continues herself: merged)
        [("user", "Title\n\nBody"), ("assistant", "A1"), ("user", "B1"), ("assistant", "A2\n\nA3")],
        # s1 > c1 > c4: three turns, the oldest dropped so the conversation opens with user
        [("user", "A1"), ("assistant", "C1")],
        # s1 > c5 (its replies are a bot and a deleted comment)
        [("user", "Title\n\nBody"), ("assistant", "D1")],
    ]
    assert [c["id"] for c in convs] == ["c9", "c4", "c5"]
    assert {c["thread"] for c in convs} == {"t3_s1"} and {c["subreddit"] for c in convs} == {"test"}
    rec = report["records"]
    assert rec["seen"] == 10 and rec["comments"] == 7 and rec["submissions"] == 1
    assert rec["rejected"] == {"bot": 1, "deleted": 1}
    assert report["comments"] == {"seen": 7, "kept": 7, "rejected": {}}
    # c8 (orphan: its parent was deleted) starts a one-turn conversation: too few turns
    assert report["conversations"] == {"seen": 4, "kept": 3, "rejected": {"too_few_turns": 1}}


def test_pairs_with_one_ancestor(tmp_path):
    _, convs = run_tree(tmp_path, mode="pairs", max_context=1)
    assert [turns(c) for c in convs] == [
        [("user", "Title\n\nBody"), ("assistant", "A1")],
        [("user", "A1"), ("assistant", "B1")],
        [("user", "B1"), ("assistant", "A2")],
        [("user", "B1"), ("assistant", "A2\n\nA3")],
        [("user", "A1"), ("assistant", "C1")],
        [("user", "Title\n\nBody"), ("assistant", "D1")],
    ]


def test_orphans_dropped_and_no_submission_turn(tmp_path):
    report, convs = run_tree(tmp_path, orphans="drop", submission_turn=False)
    assert [turns(c) for c in convs] == [
        [("user", "B1"), ("assistant", "A2\n\nA3")],  # A1 > B1 > A2+A3: odd, the oldest turn dropped
        [("user", "A1"), ("assistant", "C1")],
    ]
    assert report["comments"]["rejected"] == {"orphaned": 1}
    assert report["conversations"]["rejected"] == {"too_few_turns": 1}  # c5 alone


def test_max_turns_keeps_the_end_of_a_long_chain(tmp_path):
    rows = [comment(f"c{i}", "t3_s1" if i == 1 else f"t1_c{i - 1}", f"turn {i}", f"u{i % 2}_{i}") for i in range(1, 12)]
    _, convs = run_tree(tmp_path, rows=rows, max_turns=4)
    assert [m["content"] for m in convs[0]["messages"]] == ["turn 8", "turn 9", "turn 10", "turn 11"]


def test_filters_and_bigquery_rows(tmp_path):
    rows = [
        {"id": "s1", "title": "Q", "selftext": "[removed]", "author": "op", "subreddit": "keep", "created_utc": "1"},
        comment("c1", "t3_s1", "Good &amp; fine &gt; ok", "a", sub="keep", created="101"),  # BigQuery: strings
        comment("c2", "t1_c1", "https://example.com/x.png", "b", sub="keep"),
        comment("c3", "t1_c1", "😂😂", "b", sub="keep"),
        comment("c4", "t1_c1", "low", "b", sub="keep", score="-5"),
        comment("c5", "t1_c1", "x" * 50, "b", sub="keep"),
        comment("c6", "t1_c1", "ok!", "some_bot", sub="keep"),
        comment("c7", "t1_c1", "[removed]", "[deleted]", sub="keep"),
        comment("c8", "t3_s2", "other sub", "b", link="s2", sub="Drop"),
        comment("c9", "t3_s3", "not allowed", "b", link="s3", sub="else"),
        comment("c10", "t1_c1", "**A reply** with a [link](https://x.org) here", "c", sub="keep"),
        comment("c11", "t1_c1", "x", "d", sub="keep"),
        b'{"id": "broken", "body": "cut',
        b"[1, 2]",
        b'{"body": "no ids"}',
        b"",
    ]
    report, convs = run_tree(tmp_path, rows=rows, name="rows.json", min_score=0, min_chars=2, max_chars=40,
                             subreddits=["KEEP"], exclude_subreddits=["drop"], markdown="strip")
    assert report["records"]["rejected"] == {
        "url_only": 1, "non_text": 1, "low_score": 1, "too_long": 1, "bot": 1, "removed": 1, "subreddit_denied": 1,
        "subreddit_not_allowed": 1, "too_short": 1, "malformed_json": 1, "not_object": 1, "missing_field": 1,
        "empty": 1,
    }
    rec = report["records"]
    assert rec["seen"] == len(rows) == rec["kept"] + sum(rec["rejected"].values())
    # s1 > c1 > c10 is the only path left (three turns: the title is dropped to open with user)
    assert [turns(c) for c in convs] == [[("user", "Good & fine > ok"), ("assistant", "A reply with a link here")]]


def test_duplicates_and_parent_cycles_are_counted_not_lost():
    rows = [Comment("a", "t3_s", "u1", 1, 1, "A"), Comment("a", "t3_s", "u1", 1, 2, "A again"),
            Comment("b", "t1_a", "u2", 1, 3, "B"), Comment("x", "t1_y", "u3", 1, 4, "X"),
            Comment("y", "t1_x", "u4", 1, 5, "Y"), Comment("z", "t1_z", "u5", 1, 6, "Z")]
    res = extract_thread(rows, Submission("s", "op", "Title"), ExtractOptions())
    assert [m for _, m in res.conversations] == [[{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]]
    assert res.comment_rejects == {"duplicate_id": 1, "unreachable": 3}
    assert sorted(c.id for reason, c in res.rejected if reason == "unreachable") == ["x", "y", "z"]


@pytest.fixture(scope="module")
def synth_dump(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth_reddit(SynthRedditConfig(out=str(out), comments=4000, malformed_fraction=0.01, seed=1), verbose=False)
    return out


def test_synthetic_dump_is_long_window_pushshift_format(synth_dump):
    path = synth_dump / "RC_2020-01.zst"
    with pytest.raises(zstandard.ZstdError):  # a default decoder refuses the 2 GiB window
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read(100)
    data = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(io.BytesIO(path.read_bytes())).read()
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 4000
    rows = []
    for line in lines:
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pass
    good = [r for r in rows if isinstance(r, dict) and "body" in r]
    assert 3900 < len(good) < 4000  # some lines are malformed on purpose
    assert {"id", "parent_id", "link_id", "body", "author", "score", "subreddit", "created_utc"} <= set(good[0])
    assert any(r["body"] == "[deleted]" for r in good) and any(r["body"] == "[removed]" for r in good)
    assert any(r["author"] == "AutoModerator" for r in good)
    assert any(isinstance(r["created_utc"], str) for r in good)
    depth = {}
    for r in good:  # replies nest several levels deep
        p = r["parent_id"]
        depth[r["id"]] = 1 if p.startswith("t3_") else depth.get(p[3:], 0) + 1
    assert max(depth.values()) >= 5


def test_synthetic_dump_end_to_end(synth_dump, tmp_path):
    out = tmp_path / "out"
    cfg = RedditConfig(inputs=[str(synth_dump)], out=str(out), val_fraction=0.3, num_proc=2, write_rejects=True)
    report = run_reddit(cfg, verbose=False)
    rec = report["records"]
    assert rec["seen"] == 4000 + 160  # every line of both files
    assert rec["seen"] == rec["comments"] + rec["submissions"] + sum(rec["rejected"].values())
    assert rec["rejected"]["malformed_json"] + rec["rejected"].get("invalid_utf8", 0) > 0
    n_rejected = 0
    for part in ("records", "comments", "conversations"):
        s = report[part]
        assert s["seen"] == s["kept"] + sum(s["rejected"].values())
        n_rejected += sum(s["rejected"].values())
    rejects = read_jsonl(out / "rejects.jsonl")  # every rejected line, comment and candidate
    assert len(rejects) == n_rejected and {r["reason"] for r in rejects} >= {"deleted", "bot", "too_few_turns"}
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert len(train) == report["splits"]["train"] and len(val) == report["splits"]["val"] and val
    # the thread split leaks nothing: no thread has conversations in both splits
    assert not {c["thread"] for c in train} & {c["thread"] for c in val}
    assert report["splits"]["val_threads"] == len({c["thread"] for c in val})
    for conv in train + val:  # the chat SFT schema, as ../shared/data/*_messages.jsonl
        assert conversation_problem(conv["messages"]) is None, conv
        for m in conv["messages"]:
            assert m["content"] not in ("[deleted]", "[removed]") and "&amp;" not in m["content"]
    assert json.loads((out / "stats.json").read_text())["records"] == rec


def test_output_does_not_depend_on_processes_or_partitions(synth_dump, tmp_path):
    outs = []
    for i, (num_proc, parts) in enumerate([(1, 3), (2, 3), (2, 7), (1, 0), (2, 0)]):
        cfg = RedditConfig(inputs=[str(synth_dump)], out=str(tmp_path / str(i)), num_proc=num_proc, partitions=parts,
                           val_fraction=0.2, chunk_mb=1)
        run_reddit(cfg, verbose=False)
        outs.append((tmp_path / str(i) / "train.jsonl").read_bytes())
    assert outs[0] == outs[1]  # same partitions: byte-identical
    assert sorted(outs[0].splitlines()) == sorted(outs[2].splitlines())  # other partitions: same set
    assert outs[3] == outs[4]  # automatic partitions depend on the input only


def test_schema_matches_the_shared_conversation_files():
    if not SHARED_SGD.exists():
        pytest.skip("shared/data is not beside this checkout")
    with open(SHARED_SGD, encoding="utf-8") as f:
        for line in list(f)[:200]:
            assert conversation_problem(json.loads(line)["messages"]) is None
    assert conversation_problem([{"role": "assistant", "content": "hi"}]) is not None
    assert conversation_problem([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}])
    assert conversation_problem([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}])


def test_bad_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        run_reddit(RedditConfig(inputs=[str(tmp_path / "RC_missing.zst")], out=str(tmp_path / "o")), verbose=False)
    corrupt = tmp_path / "RC_2020-01.zst"
    corrupt.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 100)
    with pytest.raises(DataError, match="zstandard"):
        run_reddit(RedditConfig(inputs=[str(corrupt)], out=str(tmp_path / "o"), num_proc=1), verbose=False)
    full = write_ndjson(tmp_path / "RC_2020-02.zst", TREE * 50, zst=True).read_bytes()
    (tmp_path / "RC_2020-02.zst").write_bytes(full[:20])  # truncated before a single whole line
    with pytest.raises(DataError, match="no records|no conversations"):
        run_reddit(RedditConfig(inputs=[str(tmp_path / "RC_2020-02.zst")], out=str(tmp_path / "o"), num_proc=1),
                   verbose=False)
    for bad, match in [({"min_chars": 10, "max_chars": 5}, "larger than"), ({"val_fraction": 1.0}, r"\[0, 1\)"),
                       ({"min_turns": 1}, "min_turns"), ({"subreddits": ["a"], "exclude_subreddits": ["A"]}, "both"),
                       ({"out": str(corrupt)}, "directory")]:
        with pytest.raises(ConfigError, match=match):
            run_reddit(RedditConfig(inputs=[str(corrupt)], **bad), verbose=False)
    only_bad = write_ndjson(tmp_path / "bad.ndjson", [b"{", b"[deleted]"])
    with pytest.raises(DataError, match="no conversations"):
        run_reddit(RedditConfig(inputs=[str(only_bad)], out=str(tmp_path / "o"), num_proc=1), verbose=False)


def test_cli_synth_then_reddit(tmp_path, capsys, tiny_data):
    dump = tmp_path / "dump"
    assert main(["data", "synth-reddit", f"out={dump}", "comments=300", "plain=true"]) == 0
    assert (dump / "RC_2020-01.ndjson").exists()
    out = tmp_path / "out"
    assert main(["data", "reddit", "--recipe", "pairs", f"inputs=[{dump}]", f"out={out}", "num_proc=1",
                 "min_score=none"]) == 0
    printed = capsys.readouterr().out
    assert "conversations:" in printed and "train" in printed
    assert (out / "train.jsonl").exists() and (out / "stats.json").exists()
    # the printed next step chains the output into fine-tuning as it is (no path to compose)
    hint = next(line for line in printed.splitlines() if "lmforge finetune" in line).split("lmforge ", 2)[2]
    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=256, init_std=0.05)
    argv = [a.replace("CKPT", str(base)) for a in hint.split()]
    assert main([*argv, "--preview", "1"]) == 0
    assert "--- example 1 of" in capsys.readouterr().out
    code = main(["data", "reddit", f"inputs=[{dump}]", "min_chars=9", "max_chars=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
