"""``lmforge data pii``: mask personal data with typed placeholders, counted per type.

Types and what is matched (one regular expression pass, leftmost match first):

- ``url``: ``http(s)://...`` and ``www....`` links (trailing punctuation left out);
- ``email``: ``name@domain.tld``;
- ``user``: Reddit usernames ``u/name`` and ``/u/name`` (3-20 of ``A-Za-z0-9_-``);
- ``ip``: IPv4 (each octet 0-255) and IPv6 (checked by :mod:`ipaddress`);
- ``card``: 13-19 digits, optionally grouped by spaces or dashes, that pass the Luhn check;
- ``phone``: international ``+CC ...`` numbers (8-15 digits), North American
  ``(555) 123-4567`` / ``555-123-4567`` / ``555.123.4567`` / ``1-800-555-0199``.

Bare digit runs (timestamps, ids, prices) and dates are deliberately not phone numbers: the
set favours precision. A masked span becomes ``placeholder`` with ``{type}`` upper-cased
(``<EMAIL>``). On conversations every turn is masked.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .records import RecordsConfig, map_texts, run_record_stage

PII_TYPES = ("url", "email", "user", "ip", "card", "phone")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_PATTERNS = {
    "url": r"(?:https?://|www\.)[^\s<>\"'`]+",
    "email": r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])",
    "user": r"(?<![\w/])/?u/[A-Za-z0-9_-]{3,20}(?![\w-])",
    "ip": rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)"
    r"|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])",
    "card": r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4})(?![\w])",
}
_PHONE = re.compile(_PATTERNS["phone"])
_TRAILING = ".,;:!?)]}'\""


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


class PiiMasker:
    """Finds and masks the enabled PII types; counts masked spans per type in :attr:`counts`."""

    def __init__(self, types: tuple[str, ...] | list[str] = PII_TYPES, placeholder: str = "<{type}>") -> None:
        unknown = [t for t in types if t not in PII_TYPES]
        if unknown:
            raise ConfigError(f"unknown PII type(s) {', '.join(unknown)}; known: {', '.join(PII_TYPES)}")
        if not types:
            raise ConfigError("types must name at least one PII type")
        self.types = [t for t in PII_TYPES if t in types]  # the fixed precedence order
        self.placeholder = placeholder
        self.regex = re.compile("|".join(f"(?P<{t}>{_PATTERNS[t]})" for t in self.types))
        self.counts: dict[str, int] = {t: 0 for t in self.types}

    def _classify(self, m: re.Match[str]) -> tuple[int, int, str] | None:
        kind = m.lastgroup
        assert kind is not None
        start, end = m.span()
        text = m.group()
        if kind == "url":
            trimmed = text.rstrip(_TRAILING)
            while text[len(trimmed):].startswith(")") and trimmed.count("(") > trimmed.count(")"):
                trimmed += ")"  # a link with balanced parentheses (Wikipedia's)
            return start, start + len(trimmed), kind
        if kind == "ip" and ":" in text:
            try:
                ipaddress.IPv6Address(text)
            except ValueError:
                return None
            return start, end, kind
        if kind == "card":
            digits = _digits(text)
            if 13 <= len(digits) <= 19 and luhn_ok(digits):
                return start, end, kind
            if "phone" in self.types and _PHONE.fullmatch(text):
                return start, end, "phone"
            return None
        if kind == "phone" and not 8 <= len(_digits(text)) <= 15:
            return None
        return start, end, kind

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """``(start, end, type)`` of every PII span, in order."""
        spans = []
        for m in self.regex.finditer(text):
            found = self._classify(m)
            if found is not None:
                spans.append(found)
        return spans

    def mask(self, text: str) -> str:
        """``text`` with every PII span replaced by its placeholder (and counted)."""
        if not text:
            return text
        spans = self.find(text)
        if not spans:
            return text
        parts = []
        pos = 0
        for start, end, kind in spans:
            parts.append(text[pos:start])
            parts.append(self.placeholder.format(type=kind.upper()))
            self.counts[kind] += 1
            pos = end
        parts.append(text[pos:])
        return "".join(parts)


@dataclass
class PiiConfig(RecordsConfig):
    """Settings of ``lmforge data pii`` (inputs and outputs, then these)."""

    out: str = "runs/pii.jsonl"
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))
    placeholder: str = "<{type}>"  # {type} becomes EMAIL, PHONE, URL, IP, CARD, USER

    def validate(self) -> None:
        super().validate()
        if "{type}" not in self.placeholder:
            raise ConfigError(f"placeholder must contain {{type}}, got {self.placeholder!r}")
        PiiMasker(self.types, self.placeholder)


def run_pii(cfg: PiiConfig, verbose: bool = True) -> dict[str, Any]:
    """Mask PII in ``cfg.inputs`` into ``cfg.out``; the report counts masked spans per type."""
    cfg.validate()
    masker = PiiMasker(cfg.types, cfg.placeholder)
    changed = 0

    def process(rows: Iterator[tuple[str, int, dict[str, Any]]], reject: Callable[..., None]) -> Iterator[dict[str, Any]]:
        nonlocal changed
        for _, _, record in rows:
            before = sum(masker.counts.values())
            out = map_texts(record, cfg.text_field, masker.mask)
            changed += sum(masker.counts.values()) > before
            yield out

    return run_record_stage(
        "pii", cfg, process, extra=lambda: {"masked": dict(masker.counts), "records_changed": changed}, verbose=verbose
    )
