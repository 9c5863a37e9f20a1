"""Character-level tokenizer: one id per Unicode code point, as in nanoGPT's shakespeare_char.

The characters seen in the corpus get ids ``0..n-1`` in sorted order, followed by the
special tokens and ``<|unk|>`` (for characters never seen). It is expressed as a
``tokenizers`` WordLevel model behind a split-every-character pre-tokenizer, so it is
saved and loaded as the same ``tokenizer.json`` as BPE tokenizers.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..errors import DataError
from .base import CHAR_PATTERN, DEFAULT_SPECIAL_TOKENS, UNK, Tokenizer, normalize_special_tokens


def build_char(texts: Iterable[str], special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
    """Build a char tokenizer from the characters of ``texts`` (DataError when there are none)."""
    specials = normalize_special_tokens(special_tokens)
    if UNK not in specials:
        specials.append(UNK)

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise DataError("cannot build a char tokenizer from an empty corpus: no text was given")

    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    for tok in specials:
        vocab[tok] = len(vocab)

    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(hf, source="char tokenizer")
