"""``lmforge tokenizer train``: documents in, ``<out>/tokenizer.json`` out.

A command (it reads corpora through the data layer's sources), so it lives beside, not inside,
the tokenizer library: ``TokenizerTrainConfig`` is its recipe stage's typed config, ``run_train``
its run function."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from ..data.sources import SourceConfig, no_documents_error
from ..tokenizer.base import DEFAULT_SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer, normalize_special_tokens
from ..tokenizer.bpe import check_bpe_settings, train_bpe
from ..tokenizer.char import build_char


@dataclass
class TokenizerTrainConfig(SourceConfig):
    """Settings of ``lmforge tokenizer train`` (the source settings, then these)."""

    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 8192  # BPE only: ids in all, special tokens included
    min_frequency: int = 2  # BPE only: the fewest occurrences for a merge
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    out: str = "runs/tokenizer"  # directory receiving tokenizer.json

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work, before reading any data."""
        super().validate()
        specials = normalize_special_tokens(self.special_tokens)
        if self.kind == "bpe":
            check_bpe_settings(self.vocab_size, specials, self.min_frequency)


def run_train(cfg: TokenizerTrainConfig, verbose: bool = True) -> dict[str, Any]:
    """Train (BPE) or build (char) a tokenizer, save ``<out>/tokenizer.json``, return a report."""
    cfg.validate()
    start = time.perf_counter()
    stream = cfg.stream()
    docs = iter(stream)
    first = next(docs, None)
    if first is None:
        raise no_documents_error(stream.stats, stream.files)

    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars
        for text in itertools.chain([first], docs):
            n_chars += len(text)
            yield text

    if cfg.kind == "bpe":
        tok: Tokenizer = train_bpe(counted(), cfg.vocab_size, cfg.special_tokens, cfg.min_frequency, verbose)
    else:
        tok = build_char(counted(), cfg.special_tokens)
    path = tok.save(Path(cfg.out) / TOKENIZER_FILE)
    seconds = time.perf_counter() - start

    report = {
        "path": str(path),
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "eot_id": tok.eot_id,
        "documents": stream.stats.kept,
        "characters": n_chars,
        "stats": stream.stats.as_dict(),
        "seconds": round(seconds, 3),
    }
    if verbose:
        print(
            f"{tok.kind} tokenizer: vocab {tok.vocab_size:,} ({len(tok.special_tokens)} special tokens) from "
            f"{stream.stats.kept:,} documents ({n_chars:,} characters) in {seconds:.1f}s\n"
            f"  rejected records: {stream.stats.describe_rejects()}\n"
            f"  saved {path}"
        )
    return report
