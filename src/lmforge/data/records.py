"""Records in, records out: the plumbing shared by the record stages (clean, pii, dedup, augment).

A record is a JSON object holding either a text field (``text_field``, default ``text``) or a
conversation ``{"messages": [{"role", "content"}, ...]}``; other keys pass through unchanged.
Text and Parquet inputs are read through :class:`~lmforge.data.sources.DocumentStream` and
become ``{"text": ...}`` records. Every record read is kept or rejected with a reason
(:class:`~lmforge.data.sources.Stats`), rejects optionally go to a file, and each stage writes

- ``<out>``: the kept records as JSON lines, written to a temporary sibling and renamed into place;
- ``<out stem>.stats.json``: the counts (``seen == kept + sum(rejected)``), settings and timing;
- ``<out stem>.rejects.jsonl`` with ``write_rejects=true``.

Extra reject reasons of this reader, beside those of :mod:`~lmforge.data.sources`:
``bad_messages`` (``messages`` is not a list of ``{"role": str, "content": str}`` objects).
JSONL is parsed by orjson, which refuses lone surrogate escapes and nesting past 1024 levels
(``malformed_json``). A truncated ``.zst``/``.gz`` input keeps its complete records (one
``truncated`` reject, a warning); a stage fails only when nothing at all could be read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from tqdm import tqdm

from ..config import to_dict
from ..errors import ConfigError, DataError
from ..fileio import _temp_sibling, atomic_write_json
from .sources import (
    DocumentStream,
    RejectsWriter,
    Stats,
    _decode,
    _shown,
    _strip_bom,
    complete_lines,
    detect_format,
    open_compressed,
    reading_errors,
)

ROLES = ("system", "user", "assistant")


@dataclass
class RecordsConfig:
    """Inputs and outputs of a record stage (clean, pii, dedup, augment)."""

    inputs: list[str] = field(default_factory=list)  # files, directories or globs (JSONL, text, Parquet)
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSONL key holding the text (records with "messages" are conversations)
    text_unit: Literal["file", "paragraph", "line"] = "line"  # what one record of a text file is
    out: str = "runs/data-out.jsonl"  # output JSONL; stats and rejects are written beside it
    write_rejects: bool = False  # write rejected records to <out stem>.rejects.jsonl
    max_records: int | None = None  # stop after this many records read

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("no inputs given: set inputs to data files, directories or globs (inputs=[data.jsonl])")
        if not self.out or Path(self.out).is_dir():
            raise ConfigError(f"out must name a .jsonl file to write, got {self.out!r}")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"max_records must be at least 1 (or none), got {self.max_records}")


def side_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(stats.json, rejects.jsonl)`` paths beside an output file."""
    out = Path(out)
    stem = out.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(stem + ".stats.json"), out.with_name(stem + ".rejects.jsonl")


def reject(stats: Stats, reason: str, rejects: RejectsWriter | None, source: str, line: int, record: Any) -> None:
    """Count one rejected record (and write it to the rejects file)."""
    stats.rejected[reason] = stats.rejected.get(reason, 0) + 1
    if rejects is not None:
        shown = record if isinstance(record, str) else orjson.dumps(record).decode()
        rejects.write(source, line, reason, shown)


def valid_messages(messages: Any) -> bool:
    """Whether ``messages`` is a list of ``{"role": known role, "content": str}`` objects."""
    if not isinstance(messages, list) or not messages:
        return False
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return False
    return True


def conversation_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a chat SFT example (None when it is): an optional system turn, then
    user and assistant turns strictly alternating from user, ending with assistant, none empty."""
    if not valid_messages(messages):
        return "not a list of {role, content} objects with known roles"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        return "no user or assistant turn"
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            return f"turn {i} is {m['role']!r}, expected {want!r} (roles alternate from user)"
    if turns[-1]["role"] != "assistant":
        return "the last turn is not 'assistant'"
    if any(not m["content"].strip() for m in messages):
        return "an empty turn"
    return None


class RecordReader:
    """Iterates ``(source, line, record)`` over the inputs of a :class:`RecordsConfig`; counts in
    :attr:`stats` (``seen`` and rejects; the stage counts what it keeps)."""

    def __init__(self, cfg: RecordsConfig, rejects: RejectsWriter | None) -> None:
        self.cfg = cfg
        self.rejects = rejects
        self.stats = Stats()
        self.stream = DocumentStream(cfg.inputs, format=cfg.format, text_field=cfg.text_field, text_unit=cfg.text_unit)
        self.files = self.stream.files

    def reject(self, reason: str, source: str, line: int, record: Any) -> None:
        reject(self.stats, reason, self.rejects, source, line, record)

    def __iter__(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        limit = self.cfg.max_records
        for path in self.files:
            fmt = self.cfg.format if self.cfg.format != "auto" else detect_format(path)
            for item in self._jsonl(path) if fmt == "jsonl" else self._documents(path):
                if item is not None:
                    yield item
                if limit is not None and self.stats.seen >= limit:
                    return

    def _documents(self, path: Path) -> Iterator[tuple[str, int, dict[str, Any]] | None]:
        """Text and Parquet files through DocumentStream; its rejects are merged in at the end."""
        sub = DocumentStream([str(path)], format=self.cfg.format, text_unit=self.cfg.text_unit, rejects=self.rejects)
        sub.text_field = self.cfg.text_field
        try:
            for i, text in enumerate(sub, 1):
                self.stats.seen += 1
                yield str(path), i, {self.cfg.text_field: text}
        finally:
            for reason, count in sub.stats.rejected.items():
                self.stats.seen += count
                self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + count

    def _jsonl(self, path: Path) -> Iterator[tuple[str, int, dict[str, Any]] | None]:
        source = str(path)
        line_no = 0

        def cut() -> None:  # a truncated .zst/.gz: the record the cut fell in
            self.stats.seen += 1
            self.reject("truncated", source, line_no + 1, "")

        with reading_errors(path), open_compressed(path) as f:
            for line_no, raw in enumerate(complete_lines(f, path, cut), 1):
                self.stats.seen += 1
                line = _decode(_strip_bom(raw, line_no))
                if line is None:
                    self.reject("invalid_utf8", source, line_no, _shown(raw))
                    yield None
                    continue
                if not line.strip():
                    self.reject("empty", source, line_no, line)
                    yield None
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.reject("malformed_json", source, line_no, line)
                    yield None
                    continue
                if not isinstance(obj, dict):
                    self.reject("missing_text_field", source, line_no, line)
                elif "messages" in obj:
                    if valid_messages(obj["messages"]):
                        yield source, line_no, obj
                        continue
                    self.reject("bad_messages", source, line_no, line)
                elif isinstance(obj.get(self.cfg.text_field), str):
                    yield source, line_no, obj
                    continue
                else:
                    self.reject("missing_text_field", source, line_no, line)
                yield None


class JsonlWriter:
    """JSON lines written to a temporary sibling and renamed into place by :meth:`commit`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tmp = _temp_sibling(self.path)
        self._f: IO[bytes] = open(self.tmp, "xb", buffering=1 << 20)  # noqa: SIM115 (closed by commit/abort)
        self.count = 0

    def write(self, obj: Any) -> None:
        self._f.write(orjson.dumps(obj) + b"\n")
        self.count += 1

    def write_raw(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> Path:
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def text_of(record: dict[str, Any], text_field: str) -> str:
    """The text a whole-record check sees: the text field, or the turns joined by newlines."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"])
    return record[text_field]


def map_texts(record: dict[str, Any], text_field: str, fn: Callable[[str], str], roles: tuple[str, ...] = ROLES) -> dict[str, Any]:
    """A copy of ``record`` with ``fn`` applied to its text, or to each turn of the given roles."""
    if "messages" in record:
        msgs = [{**m, "content": fn(m["content"])} if m["role"] in roles else m for m in record["messages"]]
        return {**record, "messages": msgs}
    return {**record, text_field: fn(record[text_field])}


def run_record_stage(
    name: str,
    cfg: RecordsConfig,
    process: Callable[[Iterator[tuple[str, int, dict[str, Any]]], Callable[..., None]], Iterator[dict[str, Any]]],
    *,
    extra: Callable[[], dict[str, Any]] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run a record stage: read, ``process`` (a generator of kept records; it rejects through
    the ``reject(reason, source, line, record)`` callback it is handed), write, report."""
    cfg.validate()
    start = time.perf_counter()
    stats_path, rejects_path = side_paths(cfg.out)
    rejects = RejectsWriter(_temp_sibling(rejects_path)) if cfg.write_rejects else None
    out = JsonlWriter(cfg.out)
    try:
        reader = RecordReader(cfg, rejects)
        with tqdm(unit=" records", desc=name, disable=not verbose, mininterval=0.5, dynamic_ncols=True) as bar:
            for record in process(iter(reader), reader.reject):
                out.write(record)
                if out.count % 1024 == 0:
                    bar.update(reader.stats.seen - bar.n)
            bar.update(reader.stats.seen - bar.n)
        cut = reader.stats.rejected.get("truncated", 0)
        if cut and reader.stats.seen == cut:
            raise DataError(f"nothing could be read: {'every input is' if cut > 1 else 'the input is'} truncated "
                            "before its first complete record")
        out.commit()
        if rejects is not None:
            rejects.close()
            os.replace(rejects.path, rejects_path)
    except BaseException:
        out.abort()
        if rejects is not None:
            rejects.close()
            rejects.path.unlink(missing_ok=True)
        raise
    stats = reader.stats
    stats.kept = stats.seen - stats.n_rejected
    report: dict[str, Any] = {
        "stage": name,
        "out": str(cfg.out),
        "stats": stats.as_dict(),
        "written": out.count,
        **(extra() if extra else {}),
        "seconds": round(time.perf_counter() - start, 3),
        "config": to_dict(cfg),
    }
    atomic_write_json(stats_path, report)
    if verbose:
        print_summary(report)
    return report


def print_summary(report: dict[str, Any]) -> None:
    s = report["stats"]
    rejected = ", ".join(f"{r}: {n:,}" for r, n in s["rejected"].items()) or "none"
    lines = [
        (f"{report['stage']}: {s['seen']:,} records -> kept {s['kept']:,}, wrote {report['written']:,} "
         f"in {report['seconds']:.1f}s -> {report['out']}"),
        f"  rejected: {rejected}",
    ]
    for key in ("counts", "masked"):
        if report.get(key):
            lines.append(f"  {key}: " + ", ".join(f"{k}: {v:,}" for k, v in report[key].items()))
    print("\n".join(lines))


def no_records_error(stats: Stats) -> DataError:
    return DataError(f"no usable records: all {stats.seen:,} rejected ({stats.describe_rejects()})")
