"""Stream documents out of text, JSONL and Parquet files, accounting for every record.

Each record read is either yielded as a document or counted as rejected with a reason,
so ``stats.seen == stats.kept + sum(stats.rejected.values())`` always holds. Nothing is
repaired silently: a line that is not valid UTF-8 is rejected, never decoded with
replacement characters.

Rejection reasons:

- ``invalid_utf8``: a line (text or JSONL) that is not valid UTF-8. In text files the
  line is dropped and counted as one record of its own; the rest of its document is kept.
- ``invalid_unicode``: a JSONL text holding a lone UTF-16 surrogate (the escape
  ``"\ud800"``): valid JSON, but no UTF-8 text can hold it, and the tokenizer fails on it.
  Rejected rather than replaced, like invalid UTF-8: nothing is repaired silently.
- ``too_deep``: a JSONL line nested deeper than the parser's recursion limit (it crashed
  ``data prepare`` with a RecursionError).
- ``malformed_json``: a JSONL line that does not parse.
- ``missing_text_field``: a JSON value that is not an object with a string text field,
  or a null Parquet value.
- ``empty``: a document that is empty or whitespace only (in JSONL, a blank line too).
- ``truncated``: the record a truncated ``.zst`` / ``.gz`` file was cut in (the file's
  whole document with ``text_unit=file``). Every complete record before the cut is kept,
  and a warning names the file: a dump cut at 60% used to give nothing at all.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from ..errors import ConfigError, DataError
from ..paths import project_root

Format = Literal["auto", "text", "jsonl", "parquet"]
FileFormat = Literal["text", "jsonl", "parquet"]
TextUnit = Literal["file", "paragraph", "line"]

REASONS = ("invalid_utf8", "invalid_unicode", "too_deep", "malformed_json", "missing_text_field", "empty", "truncated")

_SUFFIX_FORMATS: dict[str, FileFormat] = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".gz", ".zst")
_REJECT_RECORD_CHARS = 500
_PARQUET_BATCH_ROWS = 1024


@dataclass
class Stats:
    """Record accounting: ``seen == kept + sum(rejected.values())``."""

    seen: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "rejected": dict(sorted(self.rejected.items()))}

    def describe_rejects(self) -> str:
        """``"empty: 3, malformed_json: 1"`` (or ``"none"``)."""
        return ", ".join(f"{r}: {n:,}" for r, n in sorted(self.rejected.items())) or "none"


class RejectsWriter:
    """Writes rejected records as JSON lines ``{"source", "line", "reason", "record"}``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = open(self.path, "w", encoding="utf-8")

    def write(self, source: str, line: int, reason: str, record: str) -> None:
        row = {"source": source, "line": line, "reason": reason, "record": record[:_REJECT_RECORD_CHARS]}
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RejectsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------ input resolution
def detect_format(path: str | os.PathLike[str]) -> FileFormat | None:
    """The format implied by a file name (``.gz``/``.zst`` looked through), else None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_in_dir(root: Path, fmt: Format) -> list[Path]:
    """Data files under ``root`` (recursively, sorted): recognised extensions, not hidden."""
    files = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or _is_hidden(p, root):
            continue
        detected = detect_format(p)
        if detected is not None and fmt in ("auto", detected):
            files.append(p)
    return files


def _locate(spec: str) -> Path | None:
    """``spec`` as an existing path; relative paths fall back to the lmforge checkout
    (so recipes can name embedded corpora such as ``data/tinyshakespeare.txt``)."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (project_root() / p).exists():
        return project_root() / p
    return None


def expand_spec(spec: str) -> list[Path]:
    """The paths one input names: an existing file or directory, or a glob's sorted matches;
    relative paths and patterns fall back to the lmforge checkout. Directories stay unexpanded."""
    if any(c in spec for c in "*?["):  # a glob pattern
        pattern = os.path.expanduser(spec)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches and not os.path.isabs(pattern):
            matches = sorted(glob.glob(str(project_root() / pattern), recursive=True))
        if not matches:
            raise DataError(f"no files match the input pattern '{spec}'")
        return [Path(m) for m in matches]
    found = _locate(spec)
    if found is None:
        raise DataError(f"input not found: {spec}")
    return [found]


def resolve_inputs(inputs: Sequence[str] | str, fmt: Format = "auto") -> list[Path]:
    """Expand files, directories (recursively, sorted) and globs into a list of files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    if not inputs:
        raise ConfigError("no inputs given: set inputs to data files, directories or globs (inputs=data/my.txt)")
    files: list[Path] = []
    for spec in inputs:
        for p in expand_spec(os.fspath(spec)):
            if p.is_dir():
                in_dir = _files_in_dir(p, fmt)
                if not in_dir:
                    kinds = ", ".join(sorted(_SUFFIX_FORMATS)) if fmt == "auto" else f"{fmt} files"
                    raise DataError(f"no data files found under {p} (looked for {kinds})")
                files.extend(in_dir)
            elif fmt == "auto" and detect_format(p) is None:
                raise DataError(
                    f"cannot tell the format of {p} from its extension; set format=text, jsonl or parquet"
                )
            else:
                files.append(p)
    unique: dict[Path, None] = {}
    for f in files:
        unique.setdefault(f.resolve(), None)
    return list(unique)


# ------------------------------------------------------------------------------- readers
MAX_WINDOW = 2**31  # the Pushshift dumps are compressed with zstd --long=31
_SURROGATE = re.compile("[\ud800-\udfff]")


class TruncatedInput(DataError):
    """A compressed file ends inside its last frame or member: what came before is complete."""


def warn_truncated(path: Path) -> None:
    print(f"warning: {path} is truncated (cut inside its compressed data): the complete records before the cut "
          "are kept, the cut one is counted as 'truncated'", file=sys.stderr)


def complete_lines(f: IO[bytes], path: Path, on_truncated) -> Iterator[bytes]:
    """The lines of a binary stream; when a compressed file turns out truncated, iteration ends
    after its last complete line and ``on_truncated()`` is called (once), instead of raising."""
    try:
        yield from f
    except (TruncatedInput, EOFError):
        warn_truncated(path)
        on_truncated()


class _ZstdStream(io.RawIOBase):
    """Decompressed bytes of a ``.zst`` file (frames concatenated, windows up to 2 GiB). Unlike
    zstandard's stream reader, which ends quietly, a file cut inside a frame is a DataError."""

    def __init__(self, raw: IO[bytes], path: Path) -> None:
        import zstandard

        self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._obj = self._dctx.decompressobj()
        self._raw, self._path = raw, path
        self._buf, self._pos = b"", 0
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf):
            data = self._raw.read(1 << 18)
            if not data:
                if self._in_frame:
                    raise TruncatedInput(f"{self._path} is truncated: its last zstandard frame is incomplete")
                return 0
            parts = []
            while data:
                if self._obj.eof:
                    self._obj = self._dctx.decompressobj()
                parts.append(self._obj.decompress(data))
                data = self._obj.unused_data if self._obj.eof else b""
            self._in_frame = not self._obj.eof
            self._buf, self._pos = b"".join(parts), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_compressed(path: Path, raw: IO[bytes] | None = None) -> IO[bytes]:
    """A buffered binary stream of a file's bytes: ``.zst`` (windows up to 2 GiB, frames
    concatenated, truncation detected), ``.gz``, or plain. ``raw``: the open file to read."""
    raw = raw if raw is not None else open(path, "rb")  # noqa: SIM115 (returned open)
    name = path.name.lower()
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(raw, path), 1 << 20)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


@contextmanager
def reading_errors(path: Path) -> Iterator[None]:
    """Turn a corrupt, truncated or unreadable compressed file into one :class:`DataError`."""
    try:
        yield
    except EOFError as e:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
        raise TruncatedInput(f"{path} is truncated: {e}") from None
    except OSError as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from None
    except Exception as e:  # zstandard.ZstdError
        if type(e).__module__.startswith("zstandard") or "zstd" in str(e).lower():
            raise DataError(f"{path} is not a readable zstandard file ({e})") from None
        raise


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _shown(raw: bytes) -> str:
    """A rejected line for the rejects file: invalid bytes shown as escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def _strip_bom(raw: bytes, line_no: int) -> bytes:
    return raw[3:] if line_no == 1 and raw.startswith(b"\xef\xbb\xbf") else raw


class DocumentStream:
    """An iterable over the documents of ``inputs``; counts go to :attr:`stats`.

    Paths are resolved up front, so a missing input fails at construction. Each pass
    restarts the counts; ``max_documents`` stops a pass after that many kept documents.
    """

    def __init__(
        self,
        inputs: Sequence[str] | str,
        *,
        format: Format = "auto",
        text_field: str = "text",
        text_unit: TextUnit = "file",
        max_documents: int | None = None,
        rejects: RejectsWriter | None = None,
    ) -> None:
        if format not in ("auto", "text", "jsonl", "parquet"):
            raise ConfigError(f"format {format!r} is not one of auto, text, jsonl, parquet")
        if text_unit not in ("file", "paragraph", "line"):
            raise ConfigError(f"text_unit {text_unit!r} is not one of file, paragraph, line")
        if max_documents is not None and max_documents < 1:
            raise ConfigError(f"max_documents must be at least 1 (or none), got {max_documents}")
        self.files = resolve_inputs(inputs, format)
        self.format = format
        self.text_field = text_field
        self.text_unit = text_unit
        self.max_documents = max_documents
        self.rejects = rejects
        self.stats = Stats()

    def __iter__(self) -> Iterator[str]:
        self.stats = Stats()
        stats = self.stats
        for path in self.files:
            fmt = self.format if self.format != "auto" else detect_format(path)
            reader = {"text": self._read_text, "jsonl": self._read_jsonl, "parquet": self._read_parquet}[fmt]
            for line_no, text in reader(path):
                if not text.strip():
                    self._reject(path, line_no, "empty", text)
                    continue
                stats.seen += 1
                stats.kept += 1
                yield text
                if self.max_documents is not None and stats.kept >= self.max_documents:
                    return

    def _reject(self, path: Path, line_no: int, reason: str, record: str) -> None:
        self.stats.seen += 1
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        if self.rejects is not None:
            self.rejects.write(str(path), line_no, reason, record)

    # Readers yield ``(line number, candidate text)`` and report their own rejects.
    def _read_text(self, path: Path) -> Iterator[tuple[int, str]]:
        with reading_errors(path), open_compressed(path) as f:
            if self.text_unit == "file":
                try:
                    data = f.read()
                except (TruncatedInput, EOFError):  # the file is its one document: incomplete
                    warn_truncated(path)
                    self._reject(path, 1, "truncated", "")
                    return
                text = _decode(data)
                if text is not None:  # fast path: the whole file is valid UTF-8
                    yield 1, text.removeprefix("\ufeff")
                    return
                f = io.BytesIO(data)
            lines: list[str] = []  # the current document's lines
            start = line_no = 1
            cut = []
            for line_no, raw in enumerate(complete_lines(f, path, lambda: cut.append(True)), 1):
                line = _decode(_strip_bom(raw, line_no))
                if line is None:
                    self._reject(path, line_no, "invalid_utf8", _shown(raw))
                    continue
                if self.text_unit == "line":
                    yield line_no, line.rstrip("\r\n")
                elif self.text_unit == "paragraph" and not line.strip():
                    if lines:
                        yield start, "".join(lines).rstrip("\r\n")
                    lines = []
                else:
                    if not lines:
                        start = line_no
                    lines.append(line)
            if cut:  # the document the cut fell in is incomplete: one "truncated" record, not kept
                self._reject(path, start if lines else line_no + 1, "truncated", "".join(lines))
                return
            if self.text_unit == "file":
                yield 1, "".join(lines)
            elif lines:
                yield start, "".join(lines).rstrip("\r\n")

    def _read_jsonl(self, path: Path) -> Iterator[tuple[int, str]]:
        json_array_suspect = ".json" in [s.lower() for s in path.suffixes[-2:]]
        line_no = 0
        with reading_errors(path), open_compressed(path) as f:
            for line_no, raw in enumerate(complete_lines(f, path, lambda: self._reject(path, line_no + 1, "truncated", "")), 1):
                line = _decode(_strip_bom(raw, line_no))
                if line is None:
                    self._reject(path, line_no, "invalid_utf8", _shown(raw))
                    continue
                if not line.strip():
                    self._reject(path, line_no, "empty", line)
                    continue
                if line_no == 1 and json_array_suspect and line.lstrip().startswith("["):
                    raise DataError(f"{path} holds a JSON array; lmforge reads JSON lines (one object per line)")
                try:
                    obj = json.loads(line)
                except ValueError:
                    self._reject(path, line_no, "malformed_json", line)
                    continue
                except RecursionError:
                    self._reject(path, line_no, "too_deep", line)
                    continue
                text = obj.get(self.text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    self._reject(path, line_no, "missing_text_field", line)
                    continue
                if "\\u" in line and _SURROGATE.search(text):  # only an escape can make one
                    self._reject(path, line_no, "invalid_unicode", line)
                    continue
                yield line_no, text

    def _read_parquet(self, path: Path) -> Iterator[tuple[int, str]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        if self.text_field not in schema.names:
            raise DataError(
                f"{path} has no column '{self.text_field}' (columns: {', '.join(schema.names)}); set text_field"
            )
        kind = schema.field(self.text_field).type
        is_view = getattr(pa.types, "is_string_view", lambda t: False)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
            raise DataError(f"column '{self.text_field}' of {path} holds {kind}, not text")
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[self.text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    self._reject(path, row, "missing_text_field", "null")
                else:
                    yield row, value


@dataclass
class SourceConfig:
    """Where a stage reads its documents: the settings shared by every stage that reads corpora."""

    inputs: list[str] = field(default_factory=list)  # files, directories or globs
    format: Format = "auto"
    text_field: str = "text"  # JSONL key / Parquet column holding the text
    text_unit: TextUnit = "file"  # what one document of a text file is
    max_documents: int | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` for source settings that cannot work, before reading any data."""
        if not self.inputs:
            raise ConfigError("no inputs given: set inputs to data files, directories or globs (inputs=data/my.txt)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents must be at least 1 (or none), got {self.max_documents}")

    def stream(self, rejects: RejectsWriter | None = None) -> DocumentStream:
        return DocumentStream(
            self.inputs,
            format=self.format,
            text_field=self.text_field,
            text_unit=self.text_unit,
            max_documents=self.max_documents,
            rejects=rejects,
        )


def no_documents_error(stats: Stats, files: Sequence[Path]) -> DataError:
    """The error for a corpus that yielded nothing usable."""
    where = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    if stats.seen == 0:
        return DataError(f"the corpus is empty: the {where} given hold no records")
    records = "the only record" if stats.seen == 1 else f"all {stats.seen:,} records"
    return DataError(
        f"the corpus has no usable documents: {records} in {where} {'was' if stats.seen == 1 else 'were'} "
        f"rejected ({stats.describe_rejects()})"
    )
