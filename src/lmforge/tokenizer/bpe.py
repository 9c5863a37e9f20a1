"""Byte-level BPE (the GPT-2 recipe): any UTF-8 text encodes, and decodes back exactly.

Text is first mapped to bytes, each shown as one of 256 printable symbols, so the base
vocabulary covers every possible input and no ``<unk>`` is ever needed. Merges are then
learned on top. Special tokens take the first ids, then the 256 byte symbols, then merges.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ..errors import ConfigError, DataError
from .base import DEFAULT_SPECIAL_TOKENS, Tokenizer, normalize_special_tokens

BYTE_ALPHABET_SIZE = 256


def min_bpe_vocab_size(special_tokens: Sequence[str]) -> int:
    """The smallest valid vocab: the 256 byte symbols plus every special token."""
    return BYTE_ALPHABET_SIZE + len(normalize_special_tokens(special_tokens))


def check_bpe_settings(vocab_size: int, special_tokens: Sequence[str], min_frequency: int = 2) -> None:
    """Raise :class:`ConfigError` when BPE cannot be trained with these settings."""
    specials = normalize_special_tokens(special_tokens)
    minimum = BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: the {BYTE_ALPHABET_SIZE} byte symbols "
            f"and {len(specials)} special tokens need at least {minimum}"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most ``vocab_size`` ids (specials included).

    The vocab may come out smaller when the corpus has too few pairs seen ``min_frequency``
    times. Raises :class:`ConfigError` for a too-small vocab or bad special tokens and
    :class:`DataError` when ``texts`` holds no text.
    """
    specials = normalize_special_tokens(special_tokens)
    check_bpe_settings(vocab_size, specials, min_frequency)

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )

    n_texts = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts
        for text in texts:
            if text:
                n_texts += 1
                yield text

    hf.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise DataError("cannot train a tokenizer on an empty corpus: no text was given")
    return Tokenizer(hf, source="trained BPE tokenizer")
