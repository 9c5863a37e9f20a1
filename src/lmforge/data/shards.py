"""Token shards on disk: raw little-endian numpy arrays plus one ``meta.json``.

A prepared data directory holds ``train_000000.bin, ...``, ``val_000000.bin, ...`` (no
header: ``np.memmap(path, dtype)`` reads them), ``tokenizer.json`` and ``meta.json``, which
is written last, so a directory with a ``meta.json`` is always complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

SHARDS_FORMAT = "lmforge-shards-v1"
META_FILE = "meta.json"


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype for a vocabulary: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends a token stream to ``<prefix>_000000.bin, <prefix>_000001.bin, ...`` in ``directory``,
    at most ``shard_tokens`` tokens per file. Files are created only when tokens arrive."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        self.directory = Path(directory)
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[str] = []
        self.sizes: list[int] = []
        self._file: Any = None

    @property
    def tokens(self) -> int:
        return sum(self.sizes)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._file is None or self.sizes[-1] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.sizes[-1]
            chunk, tokens = tokens[:room], tokens[room:]
            self._file.write(chunk.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.sizes[-1] += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append(name)
        self.sizes.append(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a prepared data directory (DataError when there is none)."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        what = "does not exist" if not directory.exists() else "has no meta.json"
        raise DataError(f"prepared data directory {directory} {what}; run `lmforge data prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); run `lmforge data prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARDS_FORMAT:
        raise DataError(f"{path} is not lmforge shard metadata (expected format {SHARDS_FORMAT})")
    return meta


def open_split(directory: str | os.PathLike[str], split: str) -> list[np.memmap]:
    """Read-only memmaps of a split's shards, in order (an empty list for an empty split)."""
    directory = Path(directory)
    meta = load_meta(directory)
    splits = meta.get("splits", {})
    if split not in splits:
        raise DataError(f"{directory} has no '{split}' split (available: {', '.join(splits) or 'none'})")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    arrays = []
    for name in splits[split]["shards"]:
        path = directory / name
        if not path.is_file():
            raise DataError(f"shard {path} is missing; run `lmforge data prepare` again")
        size = path.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise DataError(f"shard {path} is truncated or corrupt ({size} bytes); run `lmforge data prepare` again")
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    expected = splits[split].get("tokens")
    if expected is not None and sum(len(a) for a in arrays) != expected:
        raise DataError(f"the '{split}' shards in {directory} do not match meta.json; run `lmforge data prepare` again")
    return arrays
