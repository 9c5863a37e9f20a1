"""Streaming text from token ids: incremental decoding and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens,
and a lone token decodes to U+FFFD) and for tokenizers that drop a leading space at the
start of a decode. :class:`IncrementalDetokenizer` decodes a short window of recent ids
and releases only the new, complete text (the approach of vLLM and transformers'
TextStreamer). :class:`StopChecker` finds stop strings across token boundaries and holds
back only the end of the text that could still become one (the longest end that begins
a stop string), so a stream never shows text that the final answer does not contain.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0  # ids before this are already released as text

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopChecker:
    """Accumulates generated text; finds the first stop string; releases safe text."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.released = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        """Add decoded text; return what may be shown now. Sets ``stopped`` at a stop string."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        if self.stops:
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._partial_stop()
        if safe <= self.released:
            return ""
        out = self.text[self.released : safe]
        self.released = safe
        return out

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out = self.text[self.released :]
        self.released = len(self.text)
        return out
