"""Small text helpers shared by the data stages: HTML entities, markdown, URLs, control characters."""

from __future__ import annotations

import html
import re
import unicodedata

URL_RE = re.compile(r"(?:https?://|www\.)[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}]", re.IGNORECASE)
_URL_ONLY = re.compile(
    r"\s*(?:(?:<?(?:https?://|www\.)\S+>?|\[[^\]]*\]\(\s*\S+\s*\))\s*)+", re.IGNORECASE
)
_HAS_TEXT = re.compile(r"[^\W_]")

# markdown -> plain text (Reddit's flavour: links, emphasis, strike, spoilers, code, quotes, headers, lists)
_MD_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"!?\[([^\]]*)\]\(\s*[^)\s]+(?:\s+\"[^\"]*\")?\s*\)"), r"\1"),  # [text](url) -> text
    (re.compile(r"```[^\n]*\n?(.*?)```", re.DOTALL), r"\1"),
    (re.compile(r"`([^`\n]+)`"), r"\1"),
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])"), r"\1"),
    (re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])"), r"\1"),
    (re.compile(r"~~(.+?)~~"), r"\1"),
    (re.compile(r">!(.+?)!<"), r"\1"),
    (re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE), ""),
    (re.compile(r"^\s{0,3}(?:>\s?)+", re.MULTILINE), ""),
    (re.compile(r"^\s{0,3}(?:[-*+]|\d+[.)])\s+", re.MULTILINE), ""),
    (re.compile(r"^\s{0,3}(?:[-*_]\s*){3,}$", re.MULTILINE), ""),
    (re.compile(r"\\([\\`*_{}\[\]()#+\-.!>~^|])"), r"\1"),  # backslash escapes
    (re.compile(r"&#x200[bB];|\u200b"), ""),
]
_BLANK_LINES = re.compile(r"\n{3,}")


def unescape_html(text: str) -> str:
    """``&amp;`` -> ``&`` (Reddit stores bodies with ``&``, ``<`` and ``>`` escaped); twice for ``&amp;gt;``."""
    if "&" not in text:
        return text
    text = html.unescape(text)
    return html.unescape(text) if "&" in text and ";" in text else text


def strip_markdown(text: str) -> str:
    """Markdown markup removed, its text kept (``[a](url)`` -> ``a``, ``**b**`` -> ``b``, ``> q`` -> ``q``)."""
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def url_only(text: str) -> bool:
    """Whether the text is nothing but one or more links."""
    if "://" not in text and "www." not in text.lower():  # fast path: no link at all
        return False
    return _URL_ONLY.fullmatch(text) is not None


def has_text(text: str) -> bool:
    """Whether the text holds a letter or digit (not only emoji, symbols or punctuation)."""
    return _HAS_TEXT.search(text) is not None


# Control characters: C0/C1 controls except tab and newline, and invisible format characters
# that carry no meaning in training text. Joiners (U+200C/U+200D) stay: emoji sequences need them.
_REMOVED = [c for c in range(0x20) if c not in (0x09, 0x0A)] + list(range(0x7F, 0xA0))
_REMOVED += [0x00AD, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0x2060, 0xFEFF, 0xFFFE, 0xFFFF]
_CONTROL_TABLE = {c: None for c in _REMOVED}
_CONTROL_TABLE[0x2028] = 0x0A
_CONTROL_TABLE[0x2029] = 0x0A
_CONTROL_RE = re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(_CONTROL_TABLE)) + "]")


def remove_controls(text: str) -> str:
    """Control and invisible format characters removed (tab and newline kept; CR dropped)."""
    if _CONTROL_RE.search(text) is None:  # fast path: most texts have none
        return text
    return text.translate(_CONTROL_TABLE)


def normalize_unicode(text: str, form: str) -> str:
    """Unicode normalization (``NFC``/``NFKC``/...; ``none`` leaves the text as it is)."""
    if form == "none" or unicodedata.is_normalized(form, text):
        return text
    return unicodedata.normalize(form, text)


_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r"[ \t]+\n")


def tidy_whitespace(text: str) -> str:
    """Runs of spaces/tabs -> one space, no trailing spaces on lines, at most one blank line, trimmed."""
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()

