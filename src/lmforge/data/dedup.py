"""``lmforge data dedup``: exact and near-duplicate removal; the first occurrence is kept.

- **exact** (reason ``duplicate``): a 128-bit BLAKE2b hash of the text, after case folding and
  whitespace collapsing when ``normalize=true`` (the default).
- **near** (reason ``near_duplicate``): MinHash signatures (``num_perm`` permutations) of the
  set of word ``ngram``-shingles of the normalized text, indexed with datasketch's MinHashLSH
  at ``threshold``; an LSH candidate counts as a duplicate only when its estimated Jaccard
  similarity to the new text is at least ``threshold`` too (the LSH bands alone over-report).

A conversation is compared as its turns joined. ``against`` names files whose records are read
first and remembered, never written: an input record repeating one of them is a duplicate, so a
validation split deduplicated against its training split shares no conversation with it. Memory: the exact set keeps 16 bytes per
kept record; near dedup keeps a signature per kept record (``num_perm`` x 8 bytes) plus the
LSH tables, about 1.5 KB per record at 128 permutations: 10M records want ~15 GB, so shard a
larger corpus first (e.g. by language or source) or use a cluster engine (ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..errors import ConfigError
from .records import RecordReader, RecordsConfig, run_record_stage, text_of

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


@dataclass
class DedupConfig(RecordsConfig):
    """Settings of ``lmforge data dedup`` (inputs and outputs, then these)."""

    out: str = "runs/dedup.jsonl"
    method: Literal["exact", "near", "both"] = "both"
    normalize: bool = True  # exact: compare case-folded text with collapsed whitespace
    threshold: float = 0.7  # near: Jaccard similarity of shingle sets at which texts are duplicates
    num_perm: int = 128  # near: MinHash permutations
    ngram: int = 3  # near: words per shingle
    seed: int = 1  # near: MinHash permutations seed
    against: list[str] = field(default_factory=list)  # records of these files count as seen (e.g. the train split)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 16:
            raise ConfigError(f"num_perm must be at least 16, got {self.num_perm}")
        if self.ngram < 1:
            raise ConfigError(f"ngram must be at least 1, got {self.ngram}")


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the case-folded text (the whole text when it has fewer than n words)."""
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def _import_datasketch() -> Any:
    try:
        import datasketch
    except ImportError:
        raise ConfigError("near-duplicate removal needs datasketch: pip install datasketch") from None
    return datasketch


class Deduper:
    """Says whether each text, in order, repeats an earlier kept one: ``check(text) -> reason | None``."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.exact = cfg.method in ("exact", "both")
        self.near = cfg.method in ("near", "both")
        self.hashes: set[bytes] = set()
        if self.near:
            ds = _import_datasketch()
            self._MinHash, self._Lean = ds.MinHash, ds.LeanMinHash
            self.lsh = ds.MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
            self.signatures: dict[int, Any] = {}

    def _key(self, text: str) -> bytes:
        if self.cfg.normalize:
            text = _SPACE.sub(" ", text.casefold()).strip()
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def signature(self, text: str) -> Any:
        m = self._MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        m.update_batch(list(shingles(text, self.cfg.ngram)))
        return self._Lean(m)

    def check(self, text: str) -> str | None:
        """None when ``text`` is new (it is then remembered), else the reason it is a duplicate."""
        if self.exact:
            key = self._key(text)
            if key in self.hashes:
                return "duplicate"
        if self.near:
            sig = self.signature(text)
            for cand in self.lsh.query(sig):
                if self.signatures[cand].jaccard(sig) >= self.cfg.threshold:
                    return "near_duplicate"
            idx = len(self.signatures)
            self.signatures[idx] = sig
            self.lsh.insert(idx, sig)
        if self.exact:
            self.hashes.add(key)
        return None


def run_dedup(cfg: DedupConfig, verbose: bool = True) -> dict[str, Any]:
    """Drop exact and near duplicates of ``cfg.inputs`` into ``cfg.out``; returns the report."""
    cfg.validate()
    deduper = Deduper(cfg)
    remembered = 0
    if cfg.against:
        reference = RecordReader(replace(cfg, inputs=list(cfg.against), max_records=None), None)
        for _, _, record in reference:
            if deduper.check(text_of(record, cfg.text_field)) is None:
                remembered += 1

    def process(rows: Iterator[tuple[str, int, dict[str, Any]]], reject: Callable[..., None]) -> Iterator[dict[str, Any]]:
        for source, line, record in rows:
            reason = deduper.check(text_of(record, cfg.text_field))
            if reason:
                reject(reason, source, line, record)
            else:
                yield record

    extra = (lambda: {"against": {"files": list(cfg.against), "remembered": remembered}}) if cfg.against else None
    return run_record_stage("dedup", cfg, process, extra=extra, verbose=verbose)
