"""Data stage: document sources and their accounting, token shards, train/val splits."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import load_config
from lmforge.data import (
    DataPrepareConfig,
    DocumentStream,
    RejectsWriter,
    document_in_val,
    load_meta,
    open_split,
    resolve_inputs,
    run_prepare,
    shard_dtype,
)
from lmforge.errors import ConfigError, DataError
from lmforge.paths import embedded_data_dir
from lmforge.tokenizer import Tokenizer, build_char

SHAKESPEARE = embedded_data_dir() / "tinyshakespeare.txt"


def _docs(n: int) -> list[str]:
    return [f"Document {i}: {'lorem ipsum dolor ' * (1 + i % 5)}ends here.\n(line two)" for i in range(n)]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture()
def char_tok(tmp_path: Path) -> Path:
    """A char tokenizer over printable ASCII and newline, saved in tmp_path/tok."""
    tok = build_char([SHAKESPEARE.read_text(encoding="utf-8")[:50_000], "0123456789()"])
    return tok.save(tmp_path / "tok")


def _prepare(tmp_path: Path, tok: Path, inputs: list[Path], name: str = "out", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    cfg = DataPrepareConfig(inputs=[str(p) for p in inputs], tokenizer=str(tok), out=str(out), **kw)
    return run_prepare(cfg, verbose=False), out


def _tokens(out: Path, split: str) -> np.ndarray:
    arrays = open_split(out, split)
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint16)


# ------------------------------------------------------------------------------ sources
def test_jsonl_every_record_is_kept_or_rejected_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "first good"}\n'
        b"{not json\n"
        b'{"text": "bad \xff\xfe bytes"}\n'
        b'{"body": "no text field"}\n'
        b'["not", "an object"]\n'
        b'{"text": 42}\n'
        b"\n"
        b'{"text": "   \\n  "}\n'
        b'{"text": "second good \xc3\xa9"}\n'
    )
    rejects_path = tmp_path / "rejects.jsonl"
    with RejectsWriter(rejects_path) as rejects:
        stream = DocumentStream([str(path)], rejects=rejects)
        docs = list(stream)
    stats = stream.stats
    assert docs == ["first good", "second good é"]
    assert stats.rejected == {"malformed_json": 1, "invalid_utf8": 1, "missing_text_field": 3, "empty": 2}
    assert stats.seen == 9 and stats.kept == 2
    assert stats.seen == stats.kept + sum(stats.rejected.values())
    rows = [json.loads(line) for line in rejects_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [
        (2, "malformed_json"),
        (3, "invalid_utf8"),
        (4, "missing_text_field"),
        (5, "missing_text_field"),
        (6, "missing_text_field"),
        (7, "empty"),
        (8, "empty"),
    ]
    assert rows[1]["record"] == '{"text": "bad \\xff\\xfe bytes"}\n' and rows[0]["source"] == str(path)


def test_text_units_and_invalid_utf8_lines(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(b"Para one,\nline two.\n\n\nbroken \xff line\nPara two.\n  \nPara three\n")
    by_file = DocumentStream([str(path)], text_unit="file")
    assert list(by_file) == ["Para one,\nline two.\n\n\nPara two.\n  \nPara three\n"]
    assert by_file.stats.as_dict() == {"seen": 2, "kept": 1, "rejected": {"invalid_utf8": 1}}

    by_para = DocumentStream([str(path)], text_unit="paragraph")
    assert list(by_para) == ["Para one,\nline two.", "Para two.", "Para three"]
    assert by_para.stats.rejected == {"invalid_utf8": 1}

    by_line = DocumentStream([str(path)], text_unit="line")
    assert list(by_line) == ["Para one,", "line two.", "Para two.", "Para three"]
    assert by_line.stats.rejected == {"invalid_utf8": 1, "empty": 3}
    assert by_line.stats.seen == 8


def test_valid_text_file_is_read_exactly(tmp_path: Path) -> None:
    text = "crlf\r\nkept\ttabs  \n\n😀 end without newline"
    path = tmp_path / "t.md"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM is dropped, nothing else
    assert list(DocumentStream([str(path)])) == [text]


def test_parquet_source(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "content": ["alpha", None, " ", "delta"]}), path, row_group_size=2)
    stream = DocumentStream([str(path)], text_field="content")
    assert list(stream) == ["alpha", "delta"]
    assert stream.stats.rejected == {"missing_text_field": 1, "empty": 1} and stream.stats.seen == 4
    with pytest.raises(DataError, match="no column 'text'.*id, content"):
        list(DocumentStream([str(path)]))


def test_resolve_inputs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz"}\n'))
    (tmp_path / "d" / "README").write_text("skipped: no known extension")
    (tmp_path / "d" / ".hidden.txt").write_text("skipped: hidden")
    files = resolve_inputs([str(tmp_path / "d")])
    assert [f.name for f in files] == ["b.txt", "a.jsonl.gz"]
    assert list(DocumentStream([str(tmp_path / "d")])) == ["b", "gz"]
    assert resolve_inputs([str(tmp_path / "d" / "*.txt"), str(tmp_path / "d" / "b.txt")]) == files[:1]
    with pytest.raises(DataError, match="input not found"):
        resolve_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="no files match"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(DataError, match="cannot tell the format"):
        resolve_inputs([str(tmp_path / "d" / "README")])
    assert resolve_inputs(["data/tinyshakespeare.txt"]) == [SHAKESPEARE.resolve()]  # embedded corpus


def test_zst_input(tmp_path: Path) -> None:
    """zstandard is a dependency: .zst corpora read like plain ones, including the 2 GiB
    window of Pushshift dumps (a default decoder refuses it); a cut file keeps its complete
    records and counts the cut one as "truncated" (never silently shorter data); a corrupt
    one is one DataError."""
    import zstandard

    path = tmp_path / "d.jsonl.zst"
    data = b'{"text": "a"}\n{"text": "b"}\n' * 2000
    path.write_bytes(zstandard.ZstdCompressor().compress(data[:28]))
    assert list(DocumentStream([str(path)])) == ["a", "b"]
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    buf = io.BytesIO()  # streamed (no content size in the header), so the 2 GiB window stays
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(data)
    long_window = buf.getvalue()
    assert zstandard.get_frame_parameters(long_window).window_size == 2**31
    path.write_bytes(long_window)
    assert len(list(DocumentStream([str(path)]))) == 4000
    path.write_bytes(long_window[: len(long_window) // 2])
    stream = DocumentStream([str(path)])
    kept = list(stream)  # this tiny frame holds one block: nothing complete before the cut
    assert len(kept) < 4000 and set(kept) <= {"a", "b"}
    assert stream.stats.rejected == {"truncated": 1} and stream.stats.seen == len(kept) + 1
    path.write_bytes(b"\x28\xb5\x2f\xfd not really zstd")
    with pytest.raises(DataError, match="not a readable zstandard file|truncated"):
        list(DocumentStream([str(path)]))


def test_max_documents(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", _docs(10))
    stream = DocumentStream([str(path)], max_documents=3)
    assert len(list(stream)) == 3 and stream.stats.kept == 3


# ---------------------------------------------------------------------------- prepare
def test_shakespeare_char_recipe_matches_nanogpt_split(tmp_path: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok_path = build_char([text]).save(tmp_path / "tok")
    cfg = load_config(DataPrepareConfig, "data", "shakespeare-char", [f"tokenizer={tok_path}", f"out={tmp_path}/data"])
    report = run_prepare(cfg, verbose=False)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(data)
    train, val = _tokens(tmp_path / "data", "train"), _tokens(tmp_path / "data", "val")
    assert (len(train), len(val)) == (1_003_854, 111_540) == (int(n * 0.9), n - int(n * 0.9))
    assert np.array_equal(train, data[: int(n * 0.9)]) and np.array_equal(val, data[int(n * 0.9) :])
    assert report["val_split"] == "tail"


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.0])
def test_tail_split_takes_exactly_the_last_fraction(tmp_path: Path, char_tok: Path, val_fraction: float) -> None:
    docs = _docs(7)
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    report, out = _prepare(tmp_path, char_tok, [path], val_fraction=val_fraction, shard_tokens=50)
    tok = Tokenizer.from_file(char_tok)
    stream = np.concatenate([np.array(tok.encode(d) + [tok.eot_id]) for d in docs])
    n = len(stream)
    split = int(n * (1 - val_fraction))
    assert report["val_split"] == "tail"  # auto: fewer than 100 documents
    assert np.array_equal(_tokens(out, "train"), stream[:split])
    assert np.array_equal(_tokens(out, "val"), stream[split:])
    meta = load_meta(out)
    assert meta["splits"]["train"]["tokens"] == split and meta["splits"]["val"]["tokens"] == n - split
    assert all(len(a) <= 50 for s in ("train", "val") for a in open_split(out, s))
    ends = np.cumsum([len(tok.encode(d)) + 1 for d in docs])
    starts = ends - np.diff(ends, prepend=0)
    assert meta["splits"]["train"]["documents"] == np.sum(starts < split)  # a straddling document counts
    assert meta["splits"]["val"]["documents"] == np.sum(ends > split)  # in both splits


def test_document_split_is_deterministic_and_hash_based(tmp_path: Path, char_tok: Path) -> None:
    docs = _docs(300)
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    r1, out1 = _prepare(tmp_path, char_tok, [path], "a", val_fraction=0.2, batch_docs=64, num_proc=1)
    r2, out2 = _prepare(tmp_path, char_tok, [path], "b", val_fraction=0.2, batch_docs=7, num_proc=1)
    assert r1["val_split"] == "document"
    for split in ("train", "val"):
        assert np.array_equal(_tokens(out1, split), _tokens(out2, split))
    tok = Tokenizer.from_file(char_tok)
    in_val = [document_in_val(d, 0.2, seed=0) for d in docs]
    expected_val = [i for d, v in zip(docs, in_val) if v for i in tok.encode(d) + [tok.eot_id]]
    assert _tokens(out1, "val").tolist() == expected_val
    assert r1["splits"]["val"]["documents"] == sum(in_val) and 30 < sum(in_val) < 90
    assert r1["splits"]["train"]["documents"] + r1["splits"]["val"]["documents"] == 300
    reseeded = [document_in_val(d, 0.2, seed=1) for d in docs]
    assert reseeded != in_val


def test_parallel_output_is_identical(tmp_path: Path, char_tok: Path) -> None:
    docs = _docs(240)
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    kw = dict(val_fraction=0.1, batch_docs=16, shard_tokens=1000)
    r1, out1 = _prepare(tmp_path, char_tok, [path], "one", num_proc=1, **kw)
    r2, out2 = _prepare(tmp_path, char_tok, [path], "two", num_proc=2, **kw)
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["splits"] == r2["splits"]
    assert len(r1["splits"]["train"]["shards"]) > 1
    for split in ("train", "val"):
        for name in r1["splits"][split]["shards"]:
            assert (out1 / name).read_bytes() == (out2 / name).read_bytes()


def test_outputs_meta_and_tokenizer_copy(tmp_path: Path, char_tok: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", ["hello world", "second doc"])
    _, out = _prepare(tmp_path, char_tok, [path], val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "lmforge-shards-v1" and meta["dtype"] == "uint16"
    tok = Tokenizer.from_file(out / meta["tokenizer"])
    assert (meta["vocab_size"], meta["eot_id"]) == (tok.vocab_size, tok.eot_id)
    assert meta["stats"] == {"seen": 2, "kept": 2, "rejected": {}}
    assert meta["config"]["val_fraction"] == 0.3
    both = np.concatenate([_tokens(out, "train"), _tokens(out, "val")])
    assert tok.decode(both) == "hello world<|endoftext|>second doc<|endoftext|>"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]


def test_shard_dtype_switches_to_uint32_above_65536(tmp_path: Path) -> None:
    assert shard_dtype(65_536) == np.uint16 and shard_dtype(65_537) == np.uint32
    alphabet = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000))  # 70k distinct characters
    tok_path = build_char([alphabet]).save(tmp_path / "big")
    path = _write_jsonl(tmp_path / "d.jsonl", [alphabet[-5:], "\U00021100"])
    _, out = _prepare(tmp_path, tok_path, [path], val_fraction=0.2)
    meta = load_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65_536
    tokens = np.concatenate([_tokens(out, "train"), _tokens(out, "val")])
    assert tokens.dtype == np.uint32 and tokens.max() > 65_535
    assert Tokenizer.from_file(tok_path).decode(tokens) == alphabet[-5:] + "<|endoftext|>\U00021100<|endoftext|>"


def test_rejects_file_and_summary_counts(tmp_path: Path, char_tok: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{oops\n\n{"text": "\xff"}\n{"text": "good two"}\n')
    report, out = _prepare(tmp_path, char_tok, [path], write_rejects=True, val_fraction=0.4)
    assert report["stats"] == {"seen": 5, "kept": 2, "rejected": {"empty": 1, "invalid_utf8": 1, "malformed_json": 1}}
    reasons = [json.loads(line)["reason"] for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reasons == ["malformed_json", "empty", "invalid_utf8"]


def test_prepare_errors(tmp_path: Path, char_tok: Path) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl", _docs(3))
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
        _prepare(tmp_path, char_tok, [good], val_fraction=1.0)
    with pytest.raises(DataError, match="input not found"):
        _prepare(tmp_path, char_tok, [tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="no tokenizer found"):
        _prepare(tmp_path, tmp_path / "no-tokenizer", [good])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the corpus is empty"):
        _prepare(tmp_path, char_tok, [empty])
    empty_text = tmp_path / "empty.txt"
    empty_text.write_text("")
    with pytest.raises(DataError, match=r"no usable documents: the only record .* was rejected \(empty: 1\)"):
        _prepare(tmp_path, char_tok, [empty_text])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"all 3 records .* rejected \(empty: 3\)"):
        _prepare(tmp_path, char_tok, [blank], text_unit="line")
    one = _write_jsonl(tmp_path / "one.jsonl", ["only one small document"])
    with pytest.raises(DataError, match="val split would be empty"):
        _prepare(tmp_path, char_tok, [one], val_split="document", val_fraction=0.01)


def test_failed_run_leaves_previous_output_intact(tmp_path: Path, char_tok: Path) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl", _docs(5))
    _, out = _prepare(tmp_path, char_tok, [good])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one = _write_jsonl(tmp_path / "one.jsonl", ["x"])
    with pytest.raises(DataError):
        _prepare(tmp_path, char_tok, [one], val_split="document", val_fraction=0.01)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging left behind either


def test_shard_helpers_report_missing_or_corrupt_data(tmp_path: Path, char_tok: Path) -> None:
    with pytest.raises(DataError, match="run `lmforge data prepare` first"):
        load_meta(tmp_path / "nowhere")
    with pytest.raises(DataError, match="run `lmforge data prepare` first"):
        open_split(tmp_path, "train")
    _, out = _prepare(tmp_path, char_tok, [_write_jsonl(tmp_path / "d.jsonl", _docs(5))])
    with pytest.raises(DataError, match="no 'test' split"):
        open_split(out, "test")
    shard = out / load_meta(out)["splits"]["train"]["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated or corrupt"):
        open_split(out, "train")
