"""Corrupt corpora and dumps (issue 17): lines nested 100k deep or holding a lone surrogate
escape are counted rejects, and truncated .zst / .gz files keep every complete record, count
the cut one as "truncated" and exit 0 with a warning (non-zero only when nothing was read).
Before, each of these crashed its stage with no output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from lmforge.cli import main
from lmforge.data.reddit import RedditConfig, run_reddit
from lmforge.data.reddit_synth import SynthRedditConfig, synth_reddit

GOOD = [{"text": f"a perfectly ordinary document number {i}"} for i in range(40)]


@pytest.fixture
def char_tok(tmp_path: Path) -> Path:
    from lmforge.tokenizer import build_char

    return build_char(["abcdefghijklmnopqrstuvwxyz0123456789 .,"]).save(tmp_path / "tok")
DEEP = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
SURROGATE = b'{"text": "half an emoji \\ud83d here"}'
PAIR = b'{"text": "a whole emoji \\ud83d\\ude00 here"}'


def jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(jsonl([*GOOD[:20], DEEP, SURROGATE, PAIR, *GOOD[20:]]))
    return path


def test_prepare_counts_deep_and_surrogate_lines(tmp_path: Path, char_tok: Path, capsys) -> None:
    src = corpus(tmp_path)
    assert main(["data", "prepare", f"inputs=[{src}]", f"tokenizer={char_tok}", f"out={tmp_path / 'out'}",
                 "num_proc=1"]) == 0
    stats = json.loads((tmp_path / "out" / "meta.json").read_text())["stats"]
    assert stats["rejected"] == {"too_deep": 1, "invalid_unicode": 1} and stats["kept"] == 41


def test_tokenizer_train_counts_them_too(tmp_path: Path) -> None:
    src = corpus(tmp_path)
    for kind in ("char", "bpe"):
        out = tmp_path / kind
        args = ["tokenizer", "train", f"inputs=[{src}]", f"kind={kind}", f"out={out}"]
        assert main(args + (["vocab_size=300"] if kind == "bpe" else [])) == 0
        assert (out / "tokenizer.json").is_file()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_truncated_corpus_keeps_the_complete_records(tmp_path: Path, char_tok: Path, kind: str, capsys) -> None:
    rows = [{"text": f"document {i} " + "word " * 30} for i in range(3000)]
    full = zst(jsonl(rows)) if kind == "zst" else gzip.compress(jsonl(rows))
    src = tmp_path / f"corpus.jsonl.{kind}"
    src.write_bytes(full[: int(len(full) * 0.6)])
    assert main(["data", "prepare", f"inputs=[{src}]", f"tokenizer={char_tok}", f"out={tmp_path / 'out'}",
                 "num_proc=1"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "truncated" in err and "Traceback" not in err
    stats = json.loads((tmp_path / "out" / "meta.json").read_text())["stats"]
    assert stats["rejected"] == {"truncated": 1} and 1000 < stats["kept"] < 3000
    # a record stage over the same file keeps the same records
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", f"inputs=[{src}]", f"out={out}"]) == 0
    assert len(out.read_text().splitlines()) == stats["kept"]
    # nothing readable at all: one error line, non-zero
    src.write_bytes(full[:10])
    assert main(["data", "prepare", f"inputs=[{src}]", f"tokenizer={char_tok}", f"out={tmp_path / 'out2'}",
                 "num_proc=1"]) == 2


def test_truncated_pushshift_dump_keeps_complete_records(tmp_path: Path, capsys) -> None:
    synth_reddit(SynthRedditConfig(out=str(tmp_path / "dump"), comments=3000, seed=3), verbose=False)
    whole = run_reddit(RedditConfig(inputs=[str(tmp_path / "dump")], out=str(tmp_path / "whole"), num_proc=1),
                       verbose=False)
    rc = tmp_path / "dump" / "RC_2020-01.zst"
    data = rc.read_bytes()
    rc.write_bytes(data[: int(len(data) * 0.6)])
    assert main(["data", "reddit", f"inputs=[{tmp_path / 'dump'}]", f"out={tmp_path / 'cut'}", "num_proc=1"]) == 0
    assert "truncated" in capsys.readouterr().err
    report = json.loads((tmp_path / "cut" / "stats.json").read_text())
    assert report["records"]["rejected"].get("truncated") == 1 and report["truncated_files"] == [str(rc)]
    assert 0.3 * whole["records"]["seen"] < report["records"]["seen"] < whole["records"]["seen"]
    assert report["conversations"]["kept"] > 0
    rec = report["records"]
    assert rec["seen"] == rec["kept"] + sum(rec["rejected"].values())
