"""Tokenizers: byte-level BPE and char-level, both saved as one ``tokenizer.json``."""

from .base import DEFAULT_SPECIAL_TOKENS, EOT, PAD, TOKENIZER_FILE, UNK, Tokenizer, normalize_special_tokens
from .bpe import check_bpe_settings, min_bpe_vocab_size, train_bpe
from .char import build_char

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "EOT",
    "PAD",
    "TOKENIZER_FILE",
    "UNK",
    "Tokenizer",
    "build_char",
    "check_bpe_settings",
    "min_bpe_vocab_size",
    "normalize_special_tokens",
    "train_bpe",
]
