"""The quickstart's raw data: the embedded human conversations as a Pushshift-format month with
deleted/removed comments, bots, spam, duplicates and PII planted, through data reddit -> clean
-> pii -> dedup: every stage accounts for every record, each planted kind is rejected by the
stage meant for it, and no planted PII value reaches the training or held-out conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.chat_pipeline import accounting, masked_pii, run_chat_pipeline
from lmforge.data.reddit_dump import RedditDumpConfig, build_reddit_dump
from lmforge.errors import ConfigError


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    # more of every planted kind than the defaults, on a sample of the embedded conversations
    cfg = RedditDumpConfig(out=str(root / "dump"), max_conversations=240, deleted_fraction=0.01, removed_fraction=0.01,
                           pii_fraction=0.05, spam_fraction=0.1, repost_fraction=0.08, near_repost_fraction=0.08,
                           duplicate_record_fraction=0.02, seed=3)
    dump = build_reddit_dump(cfg, verbose=False)
    data = run_chat_pipeline([str(root / "dump")], root / "data", overrides={"reddit": ["num_proc=1"]}, verbose=False)
    return root, dump, data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_dump_is_pushshift_format(pipeline) -> None:
    import zstandard

    root, dump, _ = pipeline
    rc = root / "dump" / "RC_2019-06.zst"
    assert (root / "dump" / "RS_2019-06.zst").is_file() and (root / "dump" / "planted.json").is_file()
    with pytest.raises(zstandard.ZstdError):  # a 2 GiB window: a default decompressor refuses it, as with the real dumps
        zstandard.ZstdDecompressor().stream_reader(rc.open("rb")).read(100)
    raw = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(rc.open("rb")).read()
    lines = raw.decode().splitlines()
    assert len(lines) == dump["comments"] + dump["planted"]["duplicate_records"] + dump["planted"]["malformed_lines"]
    good = [json.loads(line) for line in lines if line.endswith("}")]
    assert {"id", "parent_id", "link_id", "body", "author", "subreddit", "created_utc"} <= set(good[0])
    assert [c["created_utc"] for c in good[:200]] == sorted(c["created_utc"] for c in good[:200])  # time order
    assert any("&amp;" in c["body"] or "&gt;" in c["body"] for c in good)  # escaped as the API returns bodies
    assert dump["conversations"] == 240 and dump["planted"]["spam_replies"] > 0


def test_every_stage_accounts_for_every_record(pipeline) -> None:
    _, dump, data = pipeline
    rows = accounting(data.reports)
    for row in rows:
        assert row["seen"] == row["kept"] + sum(row["rejected"].values()), row
    by = {(r["stage"], r["unit"]): r for r in rows}
    planted = dump["planted"]
    records = by[("reddit", "input lines")]
    assert records["seen"] == dump["comments"] + dump["submissions"] + planted["duplicate_records"] + planted["malformed_lines"]
    assert records["rejected"]["malformed_json"] == planted["malformed_lines"]
    # a duplicated record of a deleted or bot comment is rejected for that reason too: at least the planted ones
    assert records["rejected"]["bot"] >= planted["automoderator_comments"] + planted["bot_replies"]
    assert records["rejected"]["deleted"] >= planted["deleted_comments"]
    assert records["rejected"]["removed"] >= planted["removed_comments"]
    assert by[("reddit", "comments in threads")]["rejected"]["duplicate_id"] > 0
    assert by[("reddit", "comments in threads")]["rejected"]["orphaned"] > 0  # replies under deleted comments
    assert by[("clean", "train conversations")]["rejected"]["url_heavy"] > 0  # the link spam
    dedup = by[("dedup", "train conversations")]["rejected"]
    assert dedup.get("duplicate", 0) > 0 and dedup.get("near_duplicate", 0) > 0  # reposts, whole and edited
    # each stage reads what the one before kept
    for a, b in (("clean", "pii"), ("pii", "dedup")):
        for split in ("train", "val"):
            assert by[(b, f"{split} conversations")]["seen"] == by[(a, f"{split} conversations")]["kept"]


def test_planted_pii_never_reaches_the_training_data(pipeline) -> None:
    root, dump, data = pipeline
    values = [p["value"] for p in dump["pii"]]
    assert len(values) >= 20 and {p["type"] for p in dump["pii"]} == {"email", "phone", "url", "user", "ip"}
    before = (root / "data" / "reddit" / "train.jsonl").read_text() + (root / "data" / "reddit" / "val.jsonl").read_text()
    assert sum(v in before for v in values) >= len(values) // 2  # the check below can fail: they are there before
    final = data.train.read_text() + data.val.read_text()
    leaked = [v for v in values if v in final]
    assert not leaked, leaked
    distinctive = [v.split("@")[0] for p in dump["pii"] if p["type"] == "email" for v in [p["value"]]]
    distinctive += [p["value"].split("u/")[1] for p in dump["pii"] if p["type"] == "user"]
    assert not [d for d in distinctive if d in final]
    assert sum(masked_pii(data.reports).values()) >= len([v for v in values if v in before])


def test_val_shares_no_conversation_with_train(pipeline) -> None:
    _, _, data = pipeline
    key = lambda r: "\n".join(m["content"] for m in r["messages"]).casefold()  # noqa: E731
    train = {key(r) for r in read_jsonl(data.train)}
    assert read_jsonl(data.val) and not [r for r in read_jsonl(data.val) if key(r) in train]
    assert data.reports["dedup"]["val"]["against"]["remembered"] == len(train)


def test_cli_action_and_bad_settings(tmp_path: Path, capsys) -> None:
    assert main(["data", "reddit-dump", f"out={tmp_path / 'd'}", "max_conversations=20"]) == 0
    assert "planted:" in capsys.readouterr().out
    assert main(["data", "reddit-dump", f"out={tmp_path / 'd'}", "pii_fraction=2"]) == 2
    assert "pii_fraction must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="month must be YYYY-MM"):
        build_reddit_dump(RedditDumpConfig(out=str(tmp_path / "e"), month="June"), verbose=False)
    missing = tmp_path / "none.jsonl"
    assert main(["data", "reddit-dump", f"out={tmp_path / 'f'}", f"inputs=[{missing}]"]) == 2
