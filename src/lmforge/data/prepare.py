"""The ``data prepare`` stage: documents -> token shards split into train and val.

Documents are tokenized in parallel (a process pool over batches of documents, each
worker loading the tokenizer once), each followed by ``<|endoftext|>`` (unless
``add_eot=false``), and appended in input order to the train or val token stream:

- ``document`` split: a document goes to val when a stable hash of its text (salted with
  ``seed``) falls below ``val_fraction``. Reproducible, and exact duplicates never straddle
  train and val.
- ``tail`` split: the last ``val_fraction`` of the whole token stream is val, as nanoGPT
  splits Tiny Shakespeare (``train = tokens[:int(n * (1 - val_fraction))]``).
- ``auto``: ``tail`` for fewer than 100 documents (a single book), else ``document``.

Output is written to a staging directory and moved into place at the end; ``meta.json``
is written last and atomically (see :mod:`lmforge.data.shards`).
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from tqdm import tqdm

from ..config import to_dict
from ..errors import ConfigError, DataError, LmforgeError
from ..fileio import atomic_copy, atomic_write_json
from ..tokenizer.base import TOKENIZER_FILE, Tokenizer
from .shards import META_FILE, SHARDS_FORMAT, ShardWriter, shard_dtype
from .sources import RejectsWriter, SourceConfig, no_documents_error

AUTO_TAIL_MAX_DOCS = 100  # val_split=auto uses the tail split below this many documents
REJECTS_FILE = "rejects.jsonl"
_STAGING = ".prepare-tmp"
_COPY_CHUNK_TOKENS = 1 << 24


@dataclass
class DataPrepareConfig(SourceConfig):
    """Settings of ``lmforge data prepare`` (the source settings, then these)."""

    tokenizer: str = "runs/tokenizer"  # tokenizer.json, or the directory holding it
    out: str = "runs/data"
    val_fraction: float = 0.1
    val_split: Literal["auto", "document", "tail"] = "auto"
    shard_tokens: int = 100_000_000  # max tokens per shard file
    num_proc: int = 0  # tokenizer processes; 0 = one per CPU core (in-process below 100 documents)
    batch_docs: int = 1000  # documents per task sent to a process
    write_rejects: bool = False  # write rejected records to <out>/rejects.jsonl
    seed: int = 0  # salts the document-split hash
    add_eot: bool = True  # put <|endoftext|> after every document

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work, before reading any data."""
        super().validate()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("shard_tokens", "batch_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_proc < 0:
            raise ConfigError(f"num_proc must be 0 (one per core) or more, got {self.num_proc}")


def document_in_val(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether the document split puts ``text`` in val: a salted 64-bit hash below the fraction."""
    salt = (seed % 2**128).to_bytes(16, "little")
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=salt, person=b"lmforge-val")
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


def tail_split_point(n_tokens: int, val_fraction: float) -> int:
    """Tokens kept for train by the tail split (nanoGPT's ``int(n * 0.9)`` for 0.1)."""
    return int(n_tokens * (1 - val_fraction))


# ----------------------------------------------------------------------- tokenizing workers
class _Encoded(NamedTuple):
    """One batch of documents, tokenized and divided between the splits (input order kept)."""

    train: np.ndarray
    val: np.ndarray
    train_lengths: np.ndarray  # tokens per document, separator included
    val_lengths: np.ndarray
    unk: int  # tokens that are <|unk|>


class _Encoder:
    """Tokenizes batches of documents; lives once per worker process."""

    def __init__(self, tokenizer: str, add_eot: bool, val_fraction: float, seed: int, by_document: bool) -> None:
        self.tok = Tokenizer.from_file(tokenizer)
        self.dtype = shard_dtype(self.tok.vocab_size)
        self.sep = np.array([self.tok.eot_id] if add_eot else [], dtype=self.dtype)
        self.unk_id = self.tok.unk_id
        self.val_fraction = val_fraction
        self.seed = seed
        self.by_document = by_document and val_fraction > 0

    def __call__(self, texts: list[str]) -> _Encoded:
        docs = [np.concatenate([ids, self.sep]) for ids in self.tok.encode_batch_arrays(texts, self.dtype)]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        if self.by_document:
            in_val = np.array([document_in_val(t, self.val_fraction, self.seed) for t in texts], dtype=bool)
        else:
            in_val = np.zeros(len(docs), dtype=bool)
        unk = 0 if self.unk_id is None else sum(int(np.count_nonzero(d == self.unk_id)) for d in docs)

        def joined(mask: np.ndarray) -> np.ndarray:
            parts = [d for d, m in zip(docs, mask) if m]
            return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

        return _Encoded(joined(~in_val), joined(in_val), lengths[~in_val], lengths[in_val], unk)


_WORKER: _Encoder | None = None
_WORKER_ERROR: BaseException | None = None
_PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


def _init_worker(*args: Any) -> None:
    global _WORKER, _WORKER_ERROR
    os.environ[_PARALLELISM_ENV] = "false"  # the pool already uses every core
    try:
        _WORKER = _Encoder(*args)
    except BaseException as e:  # reported by the first task, with its traceback
        _WORKER_ERROR = e


def _encode_in_worker(texts: list[str]) -> _Encoded:
    if _WORKER is None:
        raise _WORKER_ERROR or RuntimeError("tokenizer worker was not initialised")
    return _WORKER(texts)


def _mp_context() -> mp.context.BaseContext:
    """fork on Linux (fast, and no re-import of ``__main__``), spawn elsewhere."""
    linux_fork = sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
    return mp.get_context("fork" if linux_fork else "spawn")


def _start_pool(num_proc: int, args: tuple[Any, ...]) -> ProcessPoolExecutor | None:
    """A started pool of tokenizer processes, or None when processes cannot start here
    (e.g. spawn from a script without an ``if __name__ == "__main__"`` guard)."""
    saved = os.environ.get(_PARALLELISM_ENV)
    os.environ[_PARALLELISM_ENV] = "false"  # inherited by forked workers; also silences tokenizers' fork warning
    try:
        pool = ProcessPoolExecutor(num_proc, mp_context=_mp_context(), initializer=_init_worker, initargs=args)
        try:
            pool.submit(_encode_in_worker, [""]).result()  # starts the workers and checks they work
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            print(f"warning: could not start {num_proc} tokenizer processes; tokenizing in this process", file=sys.stderr)
            return None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return pool
    finally:
        if saved is None:
            os.environ.pop(_PARALLELISM_ENV, None)
        else:
            os.environ[_PARALLELISM_ENV] = saved


def _ordered_map(pool: ProcessPoolExecutor, batches: Iterable[list[str]], max_pending: int) -> Iterator[_Encoded]:
    """``pool.map`` in input order with at most ``max_pending`` batches in flight (bounded memory)."""
    pending: deque[Future[_Encoded]] = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= max_pending:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise LmforgeError(
            "a tokenizer process died unexpectedly (out of memory?); try a smaller num_proc or batch_docs"
        ) from None


_EncodeFn = Callable[[Iterable[list[str]]], Iterator[_Encoded]]


@contextmanager
def _batch_encoder(num_proc: int, args: tuple[Any, ...]) -> Iterator[tuple[_EncodeFn, int]]:
    """A function mapping batches of texts to :class:`_Encoded` in order, over ``num_proc``
    processes, and the number of processes it actually uses."""
    pool = _start_pool(num_proc, args) if num_proc > 1 else None
    if pool is None:
        encoder = _Encoder(*args)
        yield (lambda batches: map(encoder, batches)), 1
        return
    try:
        yield (lambda batches: _ordered_map(pool, batches, 2 * num_proc)), num_proc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _move_tail(train: ShardWriter, val: ShardWriter, split: int) -> None:
    """Move every train token from position ``split`` on to ``val`` (truncating train shards)."""
    train.close()
    itemsize = train.dtype.itemsize
    kept_names: list[str] = []
    kept_sizes: list[int] = []
    offset = 0
    for name, size in zip(train.shards, train.sizes):
        path = train.directory / name
        cut = min(max(split - offset, 0), size)
        if cut < size:
            with open(path, "rb") as f:
                f.seek(cut * itemsize)
                for start in range(cut, size, _COPY_CHUNK_TOKENS):
                    val.write(np.fromfile(f, dtype=train.dtype, count=min(_COPY_CHUNK_TOKENS, size - start)))
            if cut:
                os.truncate(path, cut * itemsize)
            else:
                path.unlink()
        if cut:
            kept_names.append(name)
            kept_sizes.append(cut)
        offset += size
    train.shards, train.sizes = kept_names, kept_sizes
    val.close()


def _publish(staging: Path, out: Path, shards: list[str], tokenizer_file: Path, rejects: bool, meta: dict) -> None:
    """Swap the staged shards into ``out``; ``meta.json`` goes last, so it is never stale."""
    (out / META_FILE).unlink(missing_ok=True)
    for pattern in ("train_[0-9]*.bin", "val_[0-9]*.bin"):
        for old in out.glob(pattern):
            old.unlink()
    for name in shards:
        os.replace(staging / name, out / name)
    atomic_copy(tokenizer_file, out / TOKENIZER_FILE)
    if rejects:
        os.replace(staging / REJECTS_FILE, out / REJECTS_FILE)
    else:
        (out / REJECTS_FILE).unlink(missing_ok=True)
    atomic_write_json(out / META_FILE, meta)


# -------------------------------------------------------------------------------- the stage
def run_prepare(cfg: DataPrepareConfig, verbose: bool = True) -> dict[str, Any]:
    """Tokenize ``cfg.inputs`` into train/val shards under ``cfg.out``; returns the summary
    (also printed when ``verbose``)."""
    cfg.validate()
    start_time = time.perf_counter()
    tok_path = Path(cfg.tokenizer)
    tok_file = tok_path / TOKENIZER_FILE if tok_path.is_dir() else tok_path
    tok = Tokenizer.from_file(tok_file)
    dtype = shard_dtype(tok.vocab_size)

    out = Path(cfg.out)
    staging = out / _STAGING  # left over only by a crashed run: safe to clear
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rejects: RejectsWriter | None = None
    try:
        rejects = RejectsWriter(staging / REJECTS_FILE) if cfg.write_rejects else None
        stream = cfg.stream(rejects)
        docs = iter(stream)
        head = list(itertools.islice(docs, AUTO_TAIL_MAX_DOCS))
        if not head:
            raise no_documents_error(stream.stats, stream.files)
        few_docs = len(head) < AUTO_TAIL_MAX_DOCS  # the whole corpus is in ``head``
        mode = cfg.val_split if cfg.val_split != "auto" else ("tail" if few_docs else "document")
        num_proc = cfg.num_proc or os.cpu_count() or 1
        if cfg.num_proc == 0 and few_docs:
            num_proc = 1  # not worth starting processes for a handful of documents

        train = ShardWriter(staging, "train", dtype, cfg.shard_tokens)
        val = ShardWriter(staging, "val", dtype, cfg.shard_tokens)
        counts = {"train": 0, "val": 0}
        lengths: list[np.ndarray] = []  # tail split: document lengths, to count documents per split
        n_chars = unk = 0

        def counted(texts: Iterable[str]) -> Iterator[str]:
            nonlocal n_chars
            for text in texts:
                n_chars += len(text)
                yield text

        encoder_args = (str(tok_file), cfg.add_eot, cfg.val_fraction, cfg.seed, mode == "document")
        with (
            _batch_encoder(num_proc, encoder_args) as (encode, num_proc),  # before tqdm starts its thread: workers fork
            tqdm(unit=" docs", desc="tokenizing", disable=not verbose, mininterval=0.5, dynamic_ncols=True) as bar,
        ):
            batches = _batched(counted(itertools.chain(head, docs)), cfg.batch_docs)
            for res in encode(batches):
                train.write(res.train)
                val.write(res.val)
                counts["train"] += len(res.train_lengths)
                counts["val"] += len(res.val_lengths)
                unk += res.unk
                if mode == "tail":
                    lengths.append(res.train_lengths)
                bar.update(len(res.train_lengths) + len(res.val_lengths))
                bar.set_postfix_str(f"{train.tokens + val.tokens:,} tokens", refresh=False)
        train.close()
        val.close()
        if rejects is not None:
            rejects.close()

        if mode == "tail":
            doc_lengths = np.concatenate(lengths)
            split = tail_split_point(train.tokens, cfg.val_fraction)
            _move_tail(train, val, split)
            ends = np.cumsum(doc_lengths)
            counts["train"] = int(np.searchsorted(ends - doc_lengths, split, side="left"))  # starting before split
            counts["val"] = int(len(ends) - np.searchsorted(ends, split, side="right"))  # ending after it

        stats = stream.stats
        if train.tokens == 0:
            raise DataError(f"the train split is empty ({stats.kept:,} documents, {val.tokens:,} val tokens)")
        if cfg.val_fraction > 0 and val.tokens == 0:
            hint = "use val_split=tail or a larger val_fraction" if mode == "document" else "add more data"
            raise DataError(
                f"the val split would be empty: {stats.kept:,} documents with val_fraction={cfg.val_fraction} "
                f"({mode} split) gave val no tokens; {hint}"
            )

        splits = {
            name: {"shards": w.shards, "tokens": w.tokens, "documents": counts[name]}
            for name, w in (("train", train), ("val", val))
        }
        meta = {
            "format": SHARDS_FORMAT,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_kind": tok.kind,
            "val_split": mode,
            "splits": splits,
            "stats": stats.as_dict(),
            "unk_tokens": unk,
            "config": to_dict(cfg),
        }
        _publish(staging, out, train.shards + val.shards, tok_file, cfg.write_rejects, meta)
    finally:
        if rejects is not None:
            rejects.close()
        shutil.rmtree(staging, ignore_errors=True)

    seconds = time.perf_counter() - start_time
    report = {"out": str(out), **{k: meta[k] for k in ("dtype", "vocab_size", "val_split", "splits", "stats")}}
    report.update(unk_tokens=unk, characters=n_chars, processes=num_proc, seconds=round(seconds, 3))
    if verbose:
        _print_summary(report)
    return report


def _print_summary(report: dict[str, Any]) -> None:
    stats, splits, num_proc = report["stats"], report["splits"], report["processes"]
    rejected = ", ".join(f"{r}: {n:,}" for r, n in stats["rejected"].items()) or "none"
    lines = [
        f"prepared {stats['kept']:,} documents ({report['characters']:,} characters) in {report['seconds']:.1f}s "
        f"with {num_proc} process{'es' if num_proc > 1 else ''} -> {report['out']}",
        f"  vocab {report['vocab_size']:,}, {report['dtype']} shards, {report['val_split']} split",
    ]
    for name, s in splits.items():
        lines.append(f"  {name:5s} {s['tokens']:>14,} tokens {s['documents']:>10,} documents {len(s['shards']):>4} shards")
    lines.append(f"  rejected records: {rejected}")
    if report["unk_tokens"]:
        lines.append(f"  warning: {report['unk_tokens']:,} characters unknown to the tokenizer became <|unk|>")
    print("\n".join(lines))
