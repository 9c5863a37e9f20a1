"""Bits per byte: a tokenizer-independent measure of how well a model predicts text.

bits/byte = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes of the predicted tokens).
Special tokens (document separators) count as zero bytes, as in nanochat.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id of a lmforge Tokenizer (0 for special tokens)."""
    hf = tokenizer.hf
    spec = json.loads(hf.to_str())
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    specials = set(tokenizer.special_tokens)
    table = _byte_level_decoder()
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for piece, idx in hf.get_vocab(with_added_tokens=True).items():
        if idx >= len(lengths) or piece in specials:
            continue
        if byte_level and all(ch in table for ch in piece):
            lengths[idx] = len(piece)
        else:
            lengths[idx] = len(hf.decode([idx], skip_special_tokens=False).encode("utf-8"))
    return lengths


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / math.log(2) / max(1, total_bytes)
