"""Tokenizer stage: byte-level BPE and char tokenizers, save/load, errors, the train stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.errors import ConfigError, DataError
from lmforge.paths import embedded_data_dir
from lmforge.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    EOT,
    UNK,
    Tokenizer,
    build_char,
    train_bpe,
)
from lmforge.commands.tokenizer import TokenizerTrainConfig, run_train

SHAKESPEARE = embedded_data_dir() / "tinyshakespeare.txt"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Ünïcödé façade naïve résumé — “quotes” and ‘apostrophes’.",
    "日本語のテキストも大丈夫です。中文也可以。",
    "Привет, мир! Καλημέρα κόσμε. مرحبا بالعالم. שלום עולם.",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧 🇫🇷 and code:\n\tdef f(x):\n\t\treturn x ** 2\r\n",
]

ROUND_TRIP = CORPUS + [
    "",
    " leading and trailing spaces  ",
    "\n\n\nnewlines\r\nand CRLF\r\n",
    "never seen in training: ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ 🧬🦀 \u200b\u00ad e\u0301",
    "\x00\x01 control \x7f chars",
    "special tokens inline <|endoftext|> and <|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(CORPUS * 4, vocab_size=400, special_tokens=DEFAULT_SPECIAL_TOKENS, show_progress=False)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return build_char(CORPUS, DEFAULT_SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------- BPE
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trips_any_text(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_layout_and_special_tokens(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.special_tokens == list(DEFAULT_SPECIAL_TOKENS)
    assert [bpe.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS] == list(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert (bpe.eot_id, bpe.pad_id) == (0, 1)
    assert 256 + len(DEFAULT_SPECIAL_TOKENS) < bpe.vocab_size <= 400  # merges were learned
    assert len(bpe.encode("The quick brown fox")) < len("The quick brown fox")


def test_bpe_encodes_special_tokens_as_single_ids(bpe: Tokenizer) -> None:
    ids = bpe.encode("a<|endoftext|>b<|im_start|>")
    assert ids.count(bpe.eot_id) == 1
    assert ids[-1] == bpe.token_to_id("<|im_start|>")
    assert bpe.encode("<|user|>") == [bpe.token_to_id("<|user|>")]
    assert bpe.decode(ids, skip_special_tokens=True) == "ab"


def test_encode_batch_matches_encode(bpe: Tokenizer, char: Tokenizer) -> None:
    for tok in (bpe, char):
        assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]
        arrays = tok.encode_batch_arrays(ROUND_TRIP, "uint16")
        assert [a.tolist() for a in arrays] == tok.encode_batch(ROUND_TRIP)


def test_bpe_vocab_too_small_says_the_minimum() -> None:
    with pytest.raises(ConfigError, match=r"at least 263"):
        train_bpe(["hello"], vocab_size=262, special_tokens=DEFAULT_SPECIAL_TOKENS, show_progress=False)
    tok = train_bpe(["hello"], vocab_size=263, special_tokens=DEFAULT_SPECIAL_TOKENS, show_progress=False)
    assert tok.vocab_size == 263  # bytes + specials, no room for merges
    assert tok.decode(tok.encode("héllo 😀")) == "héllo 😀"


def test_special_token_validation() -> None:
    with pytest.raises(ConfigError, match="duplicate special token '<|pad|>'"):
        train_bpe(["hi"], 300, ["<|endoftext|>", "<|pad|>", "<|pad|>"], show_progress=False)
    with pytest.raises(ConfigError, match="duplicate"):
        build_char(["hi"], ["<|x|>", "<|x|>"])
    tok = train_bpe(["hello hello"], 300, ["<|pad|>"], show_progress=False)
    assert tok.special_tokens == [EOT, "<|pad|>"]  # <|endoftext|> is always added


def test_empty_corpus_is_a_data_error() -> None:
    with pytest.raises(DataError, match="empty corpus"):
        train_bpe([], 300, show_progress=False)
    with pytest.raises(DataError, match="empty corpus"):
        build_char(iter(["", ""]))


# --------------------------------------------------------------------------------- char
def test_char_round_trips_text_of_its_corpus() -> None:
    tok = build_char(ROUND_TRIP)
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode("".join(ROUND_TRIP))


def test_char_encodes_one_id_per_character(char: Tokenizer) -> None:
    text = "a b\n\nc\r\n😀\t"
    ids = char.encode(text)
    assert len(ids) == len(text)
    assert [char.id_to_token(i) for i in ids] == list(text)


def test_char_special_tokens_and_unknown_characters(char: Tokenizer) -> None:
    ids = char.encode("x<|endoftext|>y")
    assert ids[1] == char.eot_id and len(ids) == 3
    assert char.encode("☃") == [char.unk_id]  # never seen
    assert char.special_tokens == list(DEFAULT_SPECIAL_TOKENS) + [UNK]


def test_char_fast_path_matches_hugging_face(char: Tokenizer) -> None:
    for text in ROUND_TRIP + ["unseen ☃ chars\n<|im_start|>mixed ☃"]:
        assert char.encode(text) == char.hf.encode(text, add_special_tokens=False).ids


def test_char_vocab_on_shakespeare_matches_nanogpt() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = build_char([text])
    chars = sorted(set(text))
    assert len(chars) == 65
    assert [tok.token_to_id(c) for c in chars] == list(range(65))
    assert tok.eot_id == 65
    assert tok.vocab_size == 65 + len(DEFAULT_SPECIAL_TOKENS) + 1  # + <|unk|>
    sample = text[:2000]
    assert tok.encode(sample) == [chars.index(c) for c in sample]
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_and_load(kind: str, bpe: Tokenizer, char: Tokenizer, tmp_path: Path) -> None:
    tok = bpe if kind == "bpe" else char
    written = tok.save(tmp_path / "tok")  # a directory
    assert written == tmp_path / "tok" / "tokenizer.json"
    for source in (tmp_path / "tok", written):
        loaded = Tokenizer.from_file(source)
        assert loaded.kind == kind
        assert loaded.hf.to_str() == tok.hf.to_str()
        assert (loaded.vocab_size, loaded.eot_id, loaded.pad_id) == (tok.vocab_size, tok.eot_id, tok.pad_id)
        assert loaded.special_tokens == tok.special_tokens
        assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)
    assert tok.save(tmp_path / "named.json") == tmp_path / "named.json"


def test_load_errors(tmp_path: Path, bpe: Tokenizer) -> None:
    with pytest.raises(DataError, match="no tokenizer found"):
        Tokenizer.from_file(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad)
    spec = json.loads(bpe.hf.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != EOT]
    del spec["model"]["vocab"][EOT]
    bad.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(DataError, match="no <|endoftext|> token"):
        Tokenizer.from_file(bad)


# --------------------------------------------------------------------------- train stage
def test_run_train_char_recipe(tmp_path: Path) -> None:
    cfg = load_config(TokenizerTrainConfig, "tokenizer", "char", [f"out={tmp_path}"])
    report = run_train(cfg, verbose=False)
    assert report["kind"] == "char" and report["vocab_size"] == 73 and report["documents"] == 1
    assert Tokenizer.from_file(tmp_path).token_to_id("\n") == 0


def test_run_train_bpe_from_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}) for t in CORPUS * 3] + ["{broken", json.dumps({"body": "x"})]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = TokenizerTrainConfig(inputs=[str(data)], vocab_size=320, out=str(tmp_path / "tok"))
    report = run_train(cfg, verbose=False)
    assert report["documents"] == len(CORPUS) * 3
    assert report["stats"]["rejected"] == {"malformed_json": 1, "missing_text_field": 1}
    tok = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json")
    assert tok.kind == "bpe" and tok.vocab_size <= 320


def test_run_train_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 263"):
        run_train(TokenizerTrainConfig(inputs=["whatever.txt"], vocab_size=100), verbose=False)
    with pytest.raises(DataError, match="input not found"):
        run_train(TokenizerTrainConfig(inputs=[str(tmp_path / "nope.txt")]), verbose=False)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": ""}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"all 2 records .* rejected \(empty: 1, malformed_json: 1\)"):
        run_train(TokenizerTrainConfig(inputs=[str(data)], out=str(tmp_path)), verbose=False)
    with pytest.raises(ConfigError, match="no inputs"):
        run_train(TokenizerTrainConfig(), verbose=False)
