"""``lmforge data reddit``: Pushshift dumps -> chat conversations, streaming with bounded memory.

Inputs are Pushshift monthly dumps (``RC_YYYY-MM.zst`` comments, ``RS_YYYY-MM.zst`` submissions:
zstandard NDJSON with a 2 GiB window), plain or gzipped NDJSON, or BigQuery-style JSON rows
(``created_utc``/``score`` as strings). A line with ``body`` is a comment, one with ``title``
a submission, so a file may hold both.

The comments of one submission are spread over the whole month, so the work is two passes:

1. **Partition.** This process decompresses the inputs and hands newline-aligned chunks to a
   pool of worker processes, which parse (orjson), filter, clean and append each kept record,
   reduced to the fields needed, to one of ``P`` spill files on disk chosen by a hash of its
   thread (``link_id``; a submission by its own id). ``P`` grows with the input size
   (``partition_mb`` of estimated raw input per partition), so a partition's size, and with it
   the memory of pass 2, does not grow with the dump.
2. **Extract.** Workers take one partition at a time: group its comments by thread, rebuild
   each comment tree and extract conversations (:mod:`lmforge.data.conversations`), written as
   ``{"messages": [...], "thread", "subreddit", "id"}`` lines. A thread goes whole to train or
   val by a salted hash of its id, so no thread spans both. Outputs are concatenated in
   partition order, and ``P`` depends on the input alone: the result does not depend on the
   number of processes.

Output directory: ``train.jsonl``, ``val.jsonl`` (staged, then renamed into place),
``stats.json`` (written last) and, with ``write_rejects=true``, ``rejects.jsonl``: the rejected
input lines of pass 1, then the rejected comments and candidates of pass 2 (as the comment).

Accounting (``seen == kept + sum(rejected)`` for each):

- ``records`` (pass 1, every input line): ``malformed_json`` (lone surrogates and nesting past
  1024 levels too: orjson refuses both), ``invalid_utf8``, ``empty``, ``truncated`` (the line a
  cut ``.zst``/``.gz`` dump ends in: the complete lines before it are kept), ``not_object``,
  ``missing_field``, ``deleted``, ``removed``, ``bot``, ``subreddit_denied``,
  ``subreddit_not_allowed``, ``low_score``, ``url_only``, ``non_text``, ``too_short``, ``too_long``;
- ``comments`` (pass 2, kept comments): ``duplicate_id``, ``orphaned``, ``unreachable``;
- ``conversations`` (pass 2, candidate conversations): ``too_few_turns``.

Many machines: see "Data at scale" in ARCHITECTURE.md (one input file, or one partition, per task).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from tqdm import tqdm

from ..config import to_dict
from ..errors import ConfigError, DataError, LmforgeError
from ..fileio import atomic_write_json
from .conversations import Comment, ExtractOptions, Submission, extract_thread
from .prepare import _mp_context, document_in_val
from .sources import Stats, TruncatedInput, open_compressed, reading_errors, resolve_inputs, warn_truncated
from .text import has_text, strip_markdown, unescape_html, url_only

DUMP_SUFFIXES = (".zst", ".ndjson", ".jsonl", ".gz")  # found in directories (a .json file must be named)
_COMPRESSION_RATIO = {".zst": 8, ".gz": 5}  # estimated raw bytes per input byte, to size partitions
_STAGING = ".reddit-tmp"
MIN_PARTITIONS, MAX_PARTITIONS = 8, 4096
_REJECT_CHARS = 500


@dataclass
class RedditConfig:
    """Settings of ``lmforge data reddit``."""

    inputs: list[str] = field(default_factory=list)  # RC_/RS_ dumps, NDJSON files, directories or globs
    out: str = "runs/reddit"  # output directory
    # conversations
    mode: Literal["paths", "pairs"] = "paths"  # root-to-leaf paths, or (context, response) pairs
    min_turns: int = 2
    max_turns: int = 8  # keep the last N turns of a path
    max_context: int = 4  # pairs mode: ancestor turns before the response
    submission_turn: bool = True  # a submission's title/selftext opens its threads' conversations
    orphans: Literal["root", "drop"] = "root"  # replies to missing/filtered comments: new roots, or dropped
    # comment filters
    min_chars: int = 1
    max_chars: int = 2000
    min_score: int | None = None  # drop comments scored below this
    subreddits: list[str] = field(default_factory=list)  # allow list (case-insensitive); empty = all
    exclude_subreddits: list[str] = field(default_factory=list)  # deny list
    bots: list[str] = field(default_factory=lambda: ["AutoModerator"])  # authors dropped as bots
    bot_suffix: str = "bot"  # authors ending with this (case-insensitive) are bots; "" = off
    markdown: Literal["keep", "strip"] = "keep"
    # split and output
    val_fraction: float = 0.01  # share of threads in val
    seed: int = 0  # salts the thread split
    write_rejects: bool = False  # write rejected records to <out>/rejects.jsonl
    # execution
    num_proc: int = 0  # worker processes; 0 = one per CPU core
    partitions: int = 0  # spill partitions; 0 = from the input size (partition_mb each)
    partition_mb: int = 16  # estimated raw input per partition when partitions=0
    chunk_mb: int = 4  # input bytes per task of pass 1

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("no inputs given: set inputs to RC_/RS_ dumps or NDJSON files (inputs=[RC_2020-01.zst])")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_chars < 0 or self.max_chars < 1:
            raise ConfigError(f"min_chars must be >= 0 and max_chars >= 1, got {self.min_chars} and {self.max_chars}")
        if self.min_chars > self.max_chars:
            raise ConfigError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        if self.min_turns < 2:
            raise ConfigError(f"min_turns must be at least 2 (a user and an assistant turn), got {self.min_turns}")
        if self.max_turns < self.min_turns:
            raise ConfigError(f"max_turns ({self.max_turns}) is smaller than min_turns ({self.min_turns})")
        if self.mode == "pairs" and self.max_context < 1:
            raise ConfigError(f"max_context must be at least 1 in pairs mode, got {self.max_context}")
        for name in ("num_proc", "partitions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (automatic) or more, got {getattr(self, name)}")
        if self.partition_mb < 1 or self.chunk_mb < 1:
            raise ConfigError("partition_mb and chunk_mb must be at least 1")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"out must be a directory, and {self.out} is a file")
        both = {s.lower() for s in self.subreddits} & {s.lower() for s in self.exclude_subreddits}
        if both:
            raise ConfigError(f"subreddits both allowed and excluded: {', '.join(sorted(both))}")

    def extract_options(self) -> ExtractOptions:
        return ExtractOptions(self.mode, self.min_turns, self.max_turns, self.max_context, self.submission_turn, self.orphans)


# ------------------------------------------------------------------------------ input files
def resolve_dumps(inputs: Sequence[str]) -> list[Path]:
    """Files, directories (their .zst/.ndjson/.jsonl/.gz files, recursively) and globs -> files."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(DUMP_SUFFIXES)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"no dump files under {p} (looked for {', '.join(DUMP_SUFFIXES)})")
            files.extend(found)
        else:
            files.extend(resolve_inputs([spec], "jsonl"))  # files and globs; a missing one is an error
    return list(dict.fromkeys(f.resolve() for f in files))


def _read_up_to(f, n: int) -> tuple[bytes, bool]:
    """``(up to n bytes, whether the stream turned out truncated)``, one underlying read at a
    time (``read1``), so that the bytes read before a truncation are never lost."""
    parts, size = [], 0
    while size < n:
        try:
            part = f.read1(n - size)
        except (TruncatedInput, EOFError):
            return b"".join(parts), True
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts), False


def read_chunks(path: Path, chunk_bytes: int, truncated: list[Path] | None = None) -> Iterator[tuple[bytes, int, int]]:
    """``(newline-aligned bytes, first line number, input bytes read so far)`` of a dump. A dump
    cut inside its compressed data ends after its last complete line: ``path`` is appended to
    ``truncated`` (the cut line is one "truncated" record) instead of failing the whole run."""
    line = 1
    rest = b""
    raw = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    with raw, reading_errors(path), open_compressed(path, raw) as f:
        while True:
            block, was_cut = _read_up_to(f, chunk_bytes)
            if not block and not was_cut:
                break
            block = rest + block
            end = block.rfind(b"\n") + 1
            data, rest = block[:end], block[end:]
            if data:
                yield data, line, raw.tell()
                line += data.count(b"\n")
            if was_cut:
                if truncated is None:
                    raise TruncatedInput(f"{path} is truncated: its compressed data ends inside a frame")
                warn_truncated(path)
                truncated.append(path)
                return  # rest is the line the cut fell in
    if rest:
        yield rest + b"\n", line, path.stat().st_size


def estimate_raw_bytes(files: Sequence[Path]) -> int:
    total = 0
    for f in files:
        suffix = f.suffix.lower()
        total += f.stat().st_size * _COMPRESSION_RATIO.get(suffix, 1)
    return total


# ---------------------------------------------------------------------- pass 1: partition
class _Filter:
    """Per-record checks and cleaning of pass 1 (lives in each worker)."""

    def __init__(self, cfg: RedditConfig) -> None:
        self.min_chars, self.max_chars = cfg.min_chars, cfg.max_chars
        self.min_score = cfg.min_score
        self.allow = {s.lower() for s in cfg.subreddits}
        self.deny = {s.lower() for s in cfg.exclude_subreddits}
        self.bots = set(cfg.bots)
        self.bot_suffix = cfg.bot_suffix.lower()
        self.strip_md = cfg.markdown == "strip"

    def author_reason(self, author: str) -> str | None:
        if author in self.bots or (self.bot_suffix and author.lower().endswith(self.bot_suffix)):
            return "bot"
        return None

    def subreddit_reason(self, sub: str) -> str | None:
        if self.allow or self.deny:
            low = sub.lower()
            if low in self.deny:
                return "subreddit_denied"
            if self.allow and low not in self.allow:
                return "subreddit_not_allowed"
        return None

    def text(self, raw: str) -> tuple[str | None, str]:
        """``(cleaned text, "")`` or ``(None, reason)``."""
        if raw == "[deleted]":
            return None, "deleted"
        if raw == "[removed]":
            return None, "removed"
        text = unescape_html(raw)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.strip_md:
            text = strip_markdown(text)
        text = text.strip()
        if not text:
            return None, "non_text"
        if url_only(text):
            return None, "url_only"
        if not has_text(text):
            return None, "non_text"
        if len(text) < self.min_chars:
            return None, "too_short"
        if len(text) > self.max_chars:
            return None, "too_long"
        return text, ""


def _as_int(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, (str, float)):
        try:
            return int(float(v))
        except (ValueError, OverflowError):
            return None
    return None


def _bare(link: str) -> str:
    """A submission id without its ``t3_`` prefix (``link_id`` has it, a submission's ``id`` not)."""
    return link.removeprefix("t3_")


def _flush_spill(spill: Path, bufs: list[list[bytes]]) -> None:
    """Append each partition's rows to this process's spill file of that partition."""
    pid = os.getpid()
    for p, rows in enumerate(bufs):
        if rows:
            with open(spill / f"p{p:05d}.{pid}", "ab") as f:
                f.write(b"\n".join(rows) + b"\n")


def partition_chunk(data: bytes, source: str, first_line: int, spill: str, n_parts: int, cfg: RedditConfig) -> dict[str, Any]:
    """Pass 1 on one chunk of lines: returns counts; kept records go to spill files, by thread."""
    flt = _Filter(cfg)
    bufs: list[list[bytes]] = [[] for _ in range(n_parts)]
    rejected: dict[str, int] = {}
    rejects: list[bytes] = []
    seen = comments = submissions = 0
    want_rejects = cfg.write_rejects
    min_score = flt.min_score
    loads, dumps, crc32 = orjson.loads, orjson.dumps, zlib.crc32
    for i, line in enumerate(data.split(b"\n")[:-1]):
        seen += 1
        reason = ""
        try:
            obj = loads(line)
        except orjson.JSONDecodeError:
            try:
                line.decode("utf-8")
                reason = "malformed_json" if line.strip() else "empty"
            except UnicodeDecodeError:
                reason = "invalid_utf8"
            obj = None
        if obj is None:
            pass
        elif type(obj) is not dict:
            reason = "not_object"
        elif (body := obj.get("body")) is not None:  # a comment
            get = obj.get
            cid, parent, link = get("id"), get("parent_id"), get("link_id")
            author = get("author") or "[deleted]"
            sub = get("subreddit") or ""
            if (type(cid) is not str or type(parent) is not str or type(link) is not str or type(body) is not str
                    or type(author) is not str or type(sub) is not str):
                reason = "missing_field"
            else:
                text, reason = flt.text(body)
                if text is not None:
                    reason = flt.author_reason(author) or flt.subreddit_reason(sub) or ""
                score = get("score")
                if type(score) is not int:
                    score = _as_int(score) or 0
                if not reason and min_score is not None and score < min_score:
                    reason = "low_score"
                if not reason:
                    created = get("created_utc")
                    if type(created) is not int:
                        created = _as_int(created) or 0
                    thread = link.removeprefix("t3_")
                    bufs[crc32(thread.encode()) % n_parts].append(
                        dumps((0, thread, cid, parent, author, score, created, sub, text)))
                    comments += 1
        elif "title" in obj:  # a submission
            sid, title = obj.get("id"), obj.get("title")
            author = obj.get("author") or "[deleted]"
            sub = obj.get("subreddit") or ""
            selftext = obj.get("selftext") or ""
            if not (isinstance(sid, str) and isinstance(title, str) and isinstance(author, str)
                    and isinstance(sub, str) and isinstance(selftext, str)):
                reason = "missing_field"
            else:
                reason = flt.author_reason(author) or flt.subreddit_reason(sub) or ""
                if not reason:
                    head, _ = flt.text(title)
                    body, _ = flt.text(selftext) if selftext else (None, "")
                    text = "\n\n".join(t for t in (head, body) if t)
                    sid = _bare(sid)
                    score = _as_int(obj.get("score")) or 0
                    bufs[crc32(sid.encode()) % n_parts].append(dumps((1, sid, sid, "", author, score, 0, sub, text)))
                    submissions += 1
        else:
            reason = "missing_field"
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            if want_rejects:
                rec = line[:_REJECT_CHARS].decode("utf-8", errors="backslashreplace")
                rejects.append(dumps({"source": source, "line": first_line + i, "reason": reason, "record": rec}))
    _flush_spill(Path(spill), bufs)
    if rejects:
        with open(Path(spill) / f"rejects.{os.getpid()}", "ab") as f:
            f.write(b"\n".join(rejects) + b"\n")
    return {"seen": seen, "comments": comments, "submissions": submissions, "rejected": rejected}


# ------------------------------------------------------------------------- pass 2: extract
def extract_partition(p: int, spill: str, cfg: RedditConfig) -> dict[str, Any]:
    """Pass 2 on one partition: threads -> conversations in ``x{p}.train`` / ``x{p}.val``."""
    spill_dir = Path(spill)
    threads: dict[str, list[Comment]] = {}
    subs: dict[str, Submission] = {}
    sub_names: dict[str, str] = {}
    loads = orjson.loads
    for path in sorted(spill_dir.glob(f"p{p:05d}.*")):
        with open(path, "rb") as f:
            data = f.read()
        for line in data.split(b"\n"):
            if not line:
                continue
            kind, thread, rid, parent, author, score, created, sub, text = loads(line)
            if kind == 0:
                lst = threads.get(thread)
                if lst is None:
                    threads[thread] = lst = []
                lst.append(Comment(rid, parent, author, score, created, text))
                sub_names.setdefault(thread, sub)
            else:
                subs[thread] = Submission(rid, author, text)
                sub_names[thread] = sub
        path.unlink()
    opts = cfg.extract_options()
    comment_stats: dict[str, int] = {}
    cand_stats: dict[str, int] = {}
    n_comments = candidates = 0
    counts = {"train": 0, "val": 0, "train_threads": 0, "val_threads": 0}
    rejects: list[bytes] = []
    outs = {s: open(spill_dir / f"x{p:05d}.{s}", "wb", buffering=1 << 20) for s in ("train", "val")}  # noqa: SIM115
    dumps = orjson.dumps
    try:
        for thread in sorted(threads):
            comments = threads[thread]
            n_comments += len(comments)
            res = extract_thread(comments, subs.get(thread), opts)
            for reason, n in res.comment_rejects.items():
                comment_stats[reason] = comment_stats.get(reason, 0) + n
            for reason, n in res.candidate_rejects.items():
                cand_stats[reason] = cand_stats.get(reason, 0) + n
            candidates += res.candidates
            if cfg.write_rejects:
                for reason, c in res.rejected:
                    rec = orjson.dumps({"id": c.id, "parent_id": c.parent, "link_id": "t3_" + thread,
                                        "author": c.author, "body": c.body[:_REJECT_CHARS]}).decode()
                    rejects.append(dumps({"source": f"thread t3_{thread}", "line": 0, "reason": reason, "record": rec}))
            if not res.conversations:
                continue
            split = "val" if cfg.val_fraction > 0 and document_in_val(thread, cfg.val_fraction, cfg.seed) else "train"
            thread_id, subreddit = "t3_" + thread, sub_names.get(thread, "")
            f = outs[split]
            f.write(b"".join(
                dumps({"messages": msgs, "thread": thread_id, "subreddit": subreddit, "id": cid}) + b"\n"
                for cid, msgs in res.conversations
            ))
            counts[split] += len(res.conversations)
            counts[split + "_threads"] += 1
    finally:
        for f in outs.values():
            f.close()
    if rejects:
        with open(spill_dir / f"rejects.x{p:05d}", "wb") as f:
            f.write(b"\n".join(rejects) + b"\n")
    return {
        "comments": n_comments, "comment_rejects": comment_stats,
        "candidates": candidates, "candidate_rejects": cand_stats, **counts,
    }


# ------------------------------------------------------------------------------ the stage
def _bounded(pool: ProcessPoolExecutor, calls: Iterator[tuple[Any, ...]], fn: Any, max_pending: int) -> Iterator[Any]:
    """Results of ``fn(*args)`` over ``calls``, at most ``max_pending`` tasks in flight (any order)."""
    pending: list[Future[Any]] = []
    try:
        for args in calls:
            pending.append(pool.submit(fn, *args))
            while len(pending) >= max_pending:
                done = pending.pop(0)
                yield done.result()
        for fut in pending:
            yield fut.result()
    except BrokenProcessPool:
        raise LmforgeError("a data worker process died unexpectedly (out of memory?); try a smaller num_proc") from None


class _Inline:
    """The pool interface, run in this process (num_proc=1)."""

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, **_: Any) -> None:
        pass


def _add(d: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        d[k] = d.get(k, 0) + v


def _concat(paths: Sequence[Path], dest: Path) -> None:
    """Concatenate files into ``dest`` (in the kernel with sendfile where it can)."""
    with open(dest, "wb") as out:
        for p in paths:
            if not p.exists():
                continue
            with open(p, "rb") as f:
                size, offset = p.stat().st_size, 0
                try:
                    while offset < size:
                        sent = os.sendfile(out.fileno(), f.fileno(), offset, size - offset)
                        if sent == 0:
                            break
                        offset += sent
                    out.seek(0, os.SEEK_END)
                except (OSError, AttributeError):  # no sendfile here: copy through Python
                    f.seek(offset)
                    shutil.copyfileobj(f, out, 1 << 22)


def run_reddit(cfg: RedditConfig, verbose: bool = True) -> dict[str, Any]:
    """Dumps -> ``train.jsonl``/``val.jsonl`` of conversations under ``cfg.out``; returns the report."""
    cfg.validate()
    start = time.perf_counter()
    files = resolve_dumps(cfg.inputs)
    num_proc = cfg.num_proc or os.cpu_count() or 1
    raw_bytes = estimate_raw_bytes(files)
    # from the input size only (not num_proc), so the output order is the same on any machine
    n_parts = cfg.partitions or max(MIN_PARTITIONS, min(MAX_PARTITIONS, math.ceil(raw_bytes / (cfg.partition_mb << 20))))
    out = Path(cfg.out)
    staging = out / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    spill = str(staging)
    records = Stats()
    kept = {"comments": 0, "submissions": 0}
    truncated: list[Path] = []
    pool: Any = None
    try:
        pool = ProcessPoolExecutor(num_proc, mp_context=_mp_context()) if num_proc > 1 else _Inline()
        total = sum(f.stat().st_size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="pass 1: partition", disable=not verbose,
                  mininterval=0.5, dynamic_ncols=True) as bar:
            done_before = 0

            def calls() -> Iterator[tuple[Any, ...]]:
                nonlocal done_before
                for path in files:
                    last = 0
                    for data, line, pos in read_chunks(path, cfg.chunk_mb << 20, truncated):
                        yield data, str(path), line, spill, n_parts, cfg
                        bar.update(max(0, pos - last))
                        last = max(last, pos)
                    bar.update(max(0, path.stat().st_size - last))

            for res in _bounded(pool, calls(), partition_chunk, 4 * num_proc):
                records.seen += res["seen"]
                _add(records.rejected, res["rejected"])
                kept["comments"] += res["comments"]
                kept["submissions"] += res["submissions"]
        if truncated:  # each cut file lost the line it was cut in
            records.seen += len(truncated)
            records.rejected["truncated"] = records.rejected.get("truncated", 0) + len(truncated)
        records.kept = kept["comments"] + kept["submissions"]
        timings = {"pass1_s": round(time.perf_counter() - start, 3)}
        if records.seen == 0:
            raise DataError(f"the input holds no records ({len(files)} file{'s' if len(files) != 1 else ''})")

        comments, conversations = Stats(), Stats()
        counts = {"train": 0, "val": 0, "train_threads": 0, "val_threads": 0}
        with tqdm(total=n_parts, unit=" partitions", desc="pass 2: extract", disable=not verbose,
                  mininterval=0.5, dynamic_ncols=True) as bar:
            for res in _bounded(pool, ((p, spill, cfg) for p in range(n_parts)), extract_partition, 2 * num_proc):
                comments.seen += res["comments"]
                _add(comments.rejected, res["comment_rejects"])
                conversations.seen += res["candidates"]
                _add(conversations.rejected, res["candidate_rejects"])
                _add(counts, {k: res[k] for k in counts})
                bar.update(1)
        comments.kept = comments.seen - comments.n_rejected
        timings["pass2_s"] = round(time.perf_counter() - start - timings["pass1_s"], 3)
        conversations.kept = counts["train"] + counts["val"]
        if conversations.kept == 0:
            raise DataError(
                f"no conversations: {records.seen:,} records, {kept['comments']:,} comments kept "
                f"(rejected {records.describe_rejects()}); candidates rejected: {conversations.describe_rejects()}"
            )
        for split in ("train", "val"):
            _concat([staging / f"x{p:05d}.{split}" for p in range(n_parts)], staging / f"{split}.jsonl")
            os.replace(staging / f"{split}.jsonl", out / f"{split}.jsonl")
        if cfg.write_rejects:
            _concat(sorted(staging.glob("rejects.*")), staging / "rejects.jsonl")  # pass 1's, then pass 2's
            os.replace(staging / "rejects.jsonl", out / "rejects.jsonl")
        else:
            (out / "rejects.jsonl").unlink(missing_ok=True)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)

    seconds = time.perf_counter() - start
    timings["output_s"] = round(seconds - timings["pass1_s"] - timings["pass2_s"], 3)
    report = {
        "stage": "reddit",
        "out": str(out),
        "files": [str(f) for f in files],
        "truncated_files": [str(f) for f in truncated],
        "records": {**records.as_dict(), **kept},
        "comments": comments.as_dict(),
        "conversations": conversations.as_dict(),
        "splits": counts,
        "partitions": n_parts,
        "processes": num_proc,
        "seconds": round(seconds, 3),
        "comments_per_s": round(records.seen / seconds, 1) if seconds > 0 else None,
        "timings": timings,
        "config": to_dict(cfg),
    }
    atomic_write_json(out / "stats.json", report)
    if verbose:
        _print_summary(report)
    return report


def _print_summary(r: dict[str, Any]) -> None:
    rec, com, conv, s = r["records"], r["comments"], r["conversations"], r["splits"]

    def rej(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}: {v:,}" for k, v in d["rejected"].items()) or "none"

    print("\n".join([
        (f"reddit: {rec['seen']:,} records in {r['seconds']:.1f}s ({r['comments_per_s']:,.0f}/s, "
         f"{r['processes']} processes, {r['partitions']} partitions) -> {r['out']}"),
        f"  records: kept {rec['comments']:,} comments + {rec['submissions']:,} submissions; rejected {rej(rec)}",
        f"  comments in trees: {com['kept']:,} of {com['seen']:,}; rejected {rej(com)}",
        f"  conversations: {conv['kept']:,} of {conv['seen']:,} candidates; rejected {rej(conv)}",
        (f"  train {s['train']:,} conversations ({s['train_threads']:,} threads), "
         f"val {s['val']:,} ({s['val_threads']:,} threads)"),
        (f"  next: lmforge data clean inputs=[{r['out']}/train.jsonl] out=... (then pii, dedup), or fine-tune on it: "
         f"lmforge finetune base=CKPT data.train=[{r['out']}/train.jsonl]"
         + (f" data.val=[{r['out']}/val.jsonl]" if s["val"] else "")),  # no val thread: finetune splits train
    ]))
