"""``lmforge data clean``: normalize and filter any corpus (text records or conversations).

Each text (a record's text field, or every turn of a conversation) is normalized:
unicode normalization (``unicode``, NFC by default), HTML entities unescaped (``html``),
markdown stripped (``markdown=strip``), control and invisible characters removed (tab and
newline kept, emoji joiners kept), whitespace tidied. Then the record is filtered, in this
order, each a reject reason:

- ``empty`` (a text or turn empty after cleaning), ``too_short`` / ``too_long`` (characters),
  ``too_few_words``;
- ``low_alpha`` (share of letters among non-space characters below ``min_alpha_ratio``),
  ``repetitive`` (the most frequent word is more than ``max_word_repeat`` of the words, in texts
  of 10+ words), ``url_heavy`` (links take more than ``max_url_ratio`` of the characters);
- ``language`` (the detected language not in ``languages``). The language filter needs a
  detector: ``langdetect`` or ``lingua`` (``lingua-language-detector``), whichever is installed;
  without one, asking for it is a configuration error that says what to install.

For a conversation, normalization applies to each turn and the filters to all its turns
joined (a chat turn "ok" is fine; a conversation of 2 characters is not). With
``per_turn=true`` the quality filters (``low_alpha``, ``repetitive``, ``url_heavy``) also apply
to every turn on its own: one spam turn (a reply of links under a long human conversation)
rejects the conversation, where its share of the joined text would pass.
Exact and near-duplicate removal is its own stage: ``lmforge data dedup``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from .records import RecordsConfig, map_texts, run_record_stage, text_of
from .text import (
    URL_RE,
    normalize_unicode,
    remove_controls,
    strip_markdown,
    tidy_whitespace,
    unescape_html,
)

_WORD = re.compile(r"\w+")
_LETTER = re.compile(r"[^\W\d_]")
_NON_SPACE = re.compile(r"\S")


@dataclass
class CleanConfig(RecordsConfig):
    """Settings of ``lmforge data clean`` (inputs and outputs, then these)."""

    out: str = "runs/clean.jsonl"
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    html: bool = True  # unescape HTML entities (&amp; -> &)
    markdown: Literal["keep", "strip"] = "keep"
    whitespace: bool = True  # collapse runs of spaces, trim lines, at most one blank line
    min_chars: int = 1
    max_chars: int = 100_000
    min_words: int = 0
    min_alpha_ratio: float = 0.0  # e.g. 0.5: at least half the non-space characters are letters
    max_word_repeat: float = 1.0  # e.g. 0.3: no word is more than 30% of a 10+ word text
    max_url_ratio: float = 1.0  # e.g. 0.5: links take at most half the characters
    per_turn: bool = False  # conversations: the quality filters also check every turn on its own
    languages: list[str] = field(default_factory=list)  # ISO 639-1 codes to keep (needs a detector); empty = all
    min_language_chars: int = 20  # shorter texts are not language-checked

    def validate(self) -> None:
        super().validate()
        if self.min_chars < 0 or self.max_chars < 1 or self.min_words < 0:
            raise ConfigError("min_chars and min_words must be >= 0 and max_chars >= 1")
        if self.min_chars > self.max_chars:
            raise ConfigError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        for name in ("min_alpha_ratio", "max_word_repeat", "max_url_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def language_detector() -> Callable[[str], str | None]:
    """A function text -> ISO 639-1 code (None when unsure), from whichever detector is installed."""
    try:
        from lingua import LanguageDetectorBuilder

        detector = LanguageDetectorBuilder.from_all_languages().build()

        def lingua_detect(text: str) -> str | None:
            lang = detector.detect_language_of(text)
            return None if lang is None else lang.iso_code_639_1.name.lower()

        return lingua_detect
    except ImportError:
        pass
    try:
        import langdetect
        from langdetect import DetectorFactory

        DetectorFactory.seed = 0  # deterministic

        def langdetect_detect(text: str) -> str | None:
            try:
                return langdetect.detect(text).split("-")[0]
            except langdetect.LangDetectException:
                return None

        return langdetect_detect
    except ImportError:
        pass
    raise ConfigError(
        "the language filter needs a language detector: pip install langdetect "
        "(or lingua-language-detector), or leave languages empty"
    )


class Cleaner:
    """Normalizes texts and says why a text is rejected (None when kept)."""

    def __init__(self, cfg: CleanConfig, detect: Callable[[str], str | None] | None = None) -> None:
        self.cfg = cfg
        self.languages = {lang.lower() for lang in cfg.languages}
        self.detect = detect if detect is not None or not self.languages else language_detector()

    def normalize(self, text: str) -> str:
        cfg = self.cfg
        text = normalize_unicode(text, cfg.unicode)
        if cfg.html:
            text = unescape_html(text)
        text = remove_controls(text.replace("\r\n", "\n"))
        if cfg.markdown == "strip":
            text = strip_markdown(text)
        return tidy_whitespace(text) if cfg.whitespace else text

    def problem(self, text: str) -> str | None:
        cfg = self.cfg
        n = len(text)
        if n == 0 or not text.strip():
            return "empty"
        if n < cfg.min_chars:
            return "too_short"
        if n > cfg.max_chars:
            return "too_long"
        words = _WORD.findall(text) if cfg.min_words or cfg.max_word_repeat < 1.0 else []
        if len(words) < cfg.min_words:
            return "too_few_words"
        reason = self.quality_problem(text, words)
        if reason:
            return reason
        if self.languages and self.detect is not None and n >= cfg.min_language_chars:
            lang = self.detect(text)
            if lang is None or lang not in self.languages:
                return "language"
        return None

    def quality_problem(self, text: str, words: list[str] | None = None) -> str | None:
        """``low_alpha``, ``repetitive`` or ``url_heavy`` (None when the text passes them)."""
        cfg = self.cfg
        if words is None:
            words = _WORD.findall(text) if cfg.max_word_repeat < 1.0 else []
        n = len(text)
        if cfg.min_alpha_ratio > 0:
            non_space = len(_NON_SPACE.findall(text))
            if non_space and len(_LETTER.findall(text)) / non_space < cfg.min_alpha_ratio:
                return "low_alpha"
        if cfg.max_word_repeat < 1.0 and len(words) >= 10:
            top = Counter(w.lower() for w in words).most_common(1)[0][1]
            if top / len(words) > cfg.max_word_repeat:
                return "repetitive"
        if cfg.max_url_ratio < 1.0:
            url_chars = sum(len(m) for m in URL_RE.findall(text))
            if n and url_chars / n > cfg.max_url_ratio:
                return "url_heavy"
        return None

    def record(self, record: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """``(cleaned record, "")`` or ``(None, reason)``."""
        cleaned = map_texts(record, self.cfg.text_field, self.normalize)
        if "messages" in cleaned and any(not m["content"] for m in cleaned["messages"]):
            return None, "empty"
        reason = self.problem(text_of(cleaned, self.cfg.text_field))
        if not reason and self.cfg.per_turn and "messages" in cleaned:
            reason = next((r for m in cleaned["messages"] if (r := self.quality_problem(m["content"]))), None)
        return (None, reason) if reason else (cleaned, "")


def run_clean(cfg: CleanConfig, verbose: bool = True, detect: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """Clean ``cfg.inputs`` into ``cfg.out``; returns the report (also in ``<out stem>.stats.json``)."""
    cfg.validate()
    cleaner = Cleaner(cfg, detect)

    def process(rows: Iterator[tuple[str, int, dict[str, Any]]], reject: Callable[..., None]) -> Iterator[dict[str, Any]]:
        for source, line, record in rows:
            cleaned, reason = cleaner.record(record)
            if cleaned is None:
                reject(reason, source, line, record)
            else:
                yield cleaned

    return run_record_stage("clean", cfg, process, verbose=verbose)
