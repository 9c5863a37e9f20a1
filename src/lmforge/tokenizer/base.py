"""The :class:`Tokenizer` wrapper shared by every lmforge stage.

lmforge tokenizers are plain Hugging Face ``tokenizers`` objects saved as one
``tokenizer.json``; this wrapper adds the conventions the rest of the toolkit relies on:
no implicit special tokens, exact ``decode(encode(text)) == text``, a required
``<|endoftext|>`` document separator and a known ``kind`` (``"bpe"`` or ``"char"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_text

EOT = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (
    EOT,
    PAD,
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)
TOKENIZER_FILE = "tokenizer.json"

#: The pre-tokenizer regex of char tokenizers: every code point (newlines included) on its own.
CHAR_PATTERN = r"[\s\S]"

TokenizerKind = Literal["bpe", "char"]


def normalize_special_tokens(tokens: Sequence[str]) -> list[str]:
    """Validate special tokens and make sure ``<|endoftext|>`` is among them (first if added)."""
    seen: set[str] = set()
    for tok in tokens:
        if not isinstance(tok, str) or len(tok) < 2:
            raise ConfigError(f"special token {tok!r} must be a string of at least 2 characters")
        if tok in seen:
            raise ConfigError(f"duplicate special token {tok!r} in special_tokens")
        seen.add(tok)
    out = list(tokens)
    if EOT not in seen:
        out.insert(0, EOT)
    return out


class _CharTable:
    """Vectorised char-tokenizer encoding: a code point -> id lookup table.

    Gives exactly the ids of the Hugging Face pipeline (one id per code point, unknown
    code points -> ``<|unk|>``) about 50x faster. Texts containing an added token are
    left to the Hugging Face tokenizer, which recognises them.
    """

    def __init__(self, vocab: dict[str, int], unk_id: int, added: Iterable[str]) -> None:
        singles = {ord(ch): i for ch, i in vocab.items() if len(ch) == 1}
        self.table = np.full(max(singles, default=0) + 1, unk_id, dtype=np.int32)
        self.table[list(singles)] = list(singles.values())
        self.unk_id = unk_id
        self.added = [a for a in added if a]

    def encode(self, text: str) -> np.ndarray | None:
        """Ids of ``text`` as int32, or None when it contains an added token."""
        if any(a in text for a in self.added):
            return None
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        known = cps < len(self.table)
        if known.all():
            return self.table[cps]
        ids = np.full(len(cps), self.unk_id, dtype=np.int32)
        ids[known] = self.table[cps[known]]
        return ids


def _detect_kind(hf: HFTokenizer, where: str) -> tuple[TokenizerKind, _CharTable | None]:
    model = hf.model
    if isinstance(model, models.BPE):
        return "bpe", None
    if isinstance(model, models.WordLevel):
        spec = json.loads(hf.to_str())
        pre = spec.get("pre_tokenizer") or {}
        splits_chars = (
            pre.get("type") == "Split"
            and pre.get("pattern") == {"Regex": CHAR_PATTERN}
            and pre.get("behavior") == "Isolated"
            and not pre.get("invert", False)
        )
        if splits_chars and spec.get("normalizer") is None:
            unk = spec["model"].get("unk_token")
            unk_id = hf.token_to_id(unk) if unk else None
            added = [t.content for t in hf.get_added_tokens_decoder().values()]
            table = _CharTable(spec["model"]["vocab"], unk_id, added) if unk_id is not None else None
            return "char", table
    raise DataError(
        f"{where}: unsupported tokenizer model {type(model).__name__}; "
        "lmforge works with byte-level BPE and char tokenizers"
    )


def token_name(value: object) -> str | None:
    """A special-token entry of ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _sidecar_eos(folder: Path) -> str | None:
    """The EOS token named next to a ``tokenizer.json`` (imported Hugging Face models): the
    ``tokenizer`` section of an lmforge ``config.json``, else ``tokenizer_config.json``."""
    for name, pick in (
        ("config.json", lambda d: (d.get("tokenizer") or {}).get("eos_token") if d.get("format") == "lmforge" else None),
        ("tokenizer_config.json", lambda d: d.get("eos_token")),
    ):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and (tok := token_name(pick(data))):
            return tok
    return None


class Tokenizer:
    """A Hugging Face tokenizer with lmforge's conventions (see the module docstring)."""

    def __init__(self, hf: HFTokenizer, *, source: str = "tokenizer", eot_token: str | None = None) -> None:
        """``eot_token`` names the document separator when it is not ``<|endoftext|>`` (an
        imported Hugging Face tokenizer whose EOS is e.g. ``</s>``); ``<|endoftext|>`` wins
        when both exist."""
        self.hf = hf
        self.kind, self._char_table = _detect_kind(hf, source)
        eot = hf.token_to_id(EOT)
        if eot is None and eot_token:
            eot = hf.token_to_id(eot_token)
        if eot is None:
            raise DataError(f"{source}: the tokenizer has no {EOT} token, which lmforge needs to separate documents")
        self._eot_id = eot

    # ----------------------------------------------------------------- loading / saving
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or the ``tokenizer.json`` inside a directory."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"no tokenizer found at {file}; train one first with `lmforge tokenizer train`")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{file} is not a valid tokenizer.json ({reason})") from None
        return cls(hf, source=str(file), eot_token=_sidecar_eos(file.parent))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` atomically; a directory (or a path without ``.json``) gets
        ``<dir>/tokenizer.json``. Returns the file written."""
        path = Path(path)
        if path.is_dir() or path.suffix.lower() != ".json":
            path = path / TOKENIZER_FILE
        return atomic_write_text(path, self.hf.to_str(pretty=True))

    # ---------------------------------------------------------------- encoding / decoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their single id."""
        if self._char_table is not None:
            ids = self._char_table.encode(text)
            if ids is not None:
                return ids.tolist()
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts (parallel inside ``tokenizers``)."""
        if self._char_table is not None:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_batch_arrays(self, texts: Sequence[str], dtype: npt.DTypeLike = np.int64) -> list[np.ndarray]:
        """:meth:`encode_batch` returning numpy arrays of ``dtype`` (the fast path for data prep)."""
        if self._char_table is not None:
            out = []
            for text in texts:
                ids = self._char_table.encode(text)
                if ids is None:
                    ids = np.asarray(self.hf.encode(text, add_special_tokens=False).ids)
                out.append(ids.astype(dtype, copy=False))
            return out
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=dtype) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless ``skip_special_tokens``."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.hf.id_to_token(id)

    @property
    def special_tokens(self) -> list[str]:
        """Special tokens in id order."""
        added = self.hf.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added) if added[i].special]

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``, the separator placed after every document."""
        return self._eot_id

    @property
    def pad_id(self) -> int | None:
        return self.hf.token_to_id(PAD)

    @property
    def unk_id(self) -> int | None:
        """Id of ``<|unk|>`` (char tokenizers map unseen characters to it), or None."""
        return self.hf.token_to_id(UNK)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"
