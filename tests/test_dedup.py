"""Exact and near-duplicate removal: recall and precision on a corpus with planted near-duplicates."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.data import dedup as dedup_mod
from lmforge.data.dedup import DedupConfig, Deduper, run_dedup, shingles
from lmforge.errors import ConfigError

VOCAB = [f"w{i}" for i in range(3000)]


def near_copy(words: list[str], rng: random.Random, rate: float) -> list[str]:
    """A few word edits (replace, delete, insert), plus case and punctuation changes."""
    out = []
    for w in words:
        r = rng.random()
        if r < rate / 3:
            out.append(rng.choice(VOCAB))
        elif r < 2 * rate / 3:
            continue
        elif r < rate:
            out.extend([w, rng.choice(VOCAB)])
        else:
            out.append(w.upper() if rng.random() < 0.05 else w)
    return out


def planted_corpus(n_base: int = 300, seed: int = 0) -> tuple[list[str], set[int]]:
    """Unique texts, near copies of some (1-3% word edits), and hard negatives (texts sharing
    about half their words with another); returns the texts and the indices of the planted copies."""
    rng = random.Random(seed)
    texts: list[str] = []
    dups: set[int] = set()
    bases = []
    for _ in range(n_base):
        words = rng.choices(VOCAB, k=rng.randint(40, 150))
        bases.append(words)
        texts.append(" ".join(words))
    for b in rng.sample(range(n_base), n_base // 2):
        for _ in range(rng.randint(1, 2)):
            dups.add(len(texts))
            copy = near_copy(bases[b], rng, rng.uniform(0.01, 0.03))
            texts.append(" ".join(copy) + rng.choice(["", ".", "!", "  "]))
    for b in rng.sample(range(n_base), n_base // 3):  # hard negatives: half the text replaced
        words = list(bases[b])
        half = len(words) // 2
        words[half:] = rng.choices(VOCAB, k=len(words) - half)
        texts.append(" ".join(words))
    order = list(range(len(texts)))  # shuffle, keeping every copy after its original
    tail = order[n_base:]
    rng.shuffle(tail)
    order = order[:n_base] + tail
    return [texts[i] for i in order], {j for j, i in enumerate(order) if i in dups}


def test_near_duplicate_recall_and_precision():
    texts, planted = planted_corpus()
    deduper = Deduper(DedupConfig(inputs=["-"], method="near"))
    flagged = {i for i, t in enumerate(texts) if deduper.check(t) == "near_duplicate"}
    tp = len(flagged & planted)
    recall, precision = tp / len(planted), tp / max(1, len(flagged))
    print(f"near-dup recall {recall:.4f} precision {precision:.4f} ({len(planted)} planted in {len(texts)} texts)")
    assert recall >= 0.9 and precision >= 0.95


def test_exact_duplicates_after_normalization():
    deduper = Deduper(DedupConfig(inputs=["-"], method="exact"))
    assert deduper.check("Hello   World") is None
    assert deduper.check("hello world") == "duplicate"
    assert deduper.check("hello world!") is None
    strict = Deduper(DedupConfig(inputs=["-"], method="exact", normalize=False))
    assert strict.check("Hello World") is None and strict.check("hello world") is None


def test_shingles():
    assert shingles("A b, c d", 3) == {b"a b c", b"b c d"}
    assert shingles("Short text", 3) == {b"short text"}


def test_stage_on_conversations_and_text(tmp_path):
    src = tmp_path / "in.jsonl"
    conv = {"messages": [{"role": "user", "content": "hi there how are you"},
                         {"role": "assistant", "content": "fine thanks and you"}]}
    text = " ".join(f"word{i}" for i in range(60))
    rows = [conv, conv, {"text": text}, {"text": text.replace("word30", "other")}, {"text": "unique"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    report = run_dedup(DedupConfig(inputs=[str(src)], out=str(out), write_rejects=True), verbose=False)
    assert report["stats"] == {"seen": 5, "kept": 3, "rejected": {"duplicate": 1, "near_duplicate": 1}}
    assert [json.loads(x) for x in out.read_text().splitlines()] == [rows[0], rows[2], rows[4]]
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert reasons == ["duplicate", "near_duplicate"]
    with pytest.raises(ConfigError, match="threshold"):
        run_dedup(DedupConfig(inputs=[str(src)], out=str(out), threshold=0), verbose=False)


def test_against_drops_records_repeating_another_split(tmp_path):
    text = " ".join(f"word{i}" for i in range(60))
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "kept in train"}) + "\n")
    rows = [{"text": text.upper()}, {"text": text.replace("word7", "seven")}, {"text": "only in val"}]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "val.dedup.jsonl"
    report = run_dedup(DedupConfig(inputs=[str(val)], against=[str(train)], out=str(out)), verbose=False)
    assert report["stats"] == {"seen": 3, "kept": 1, "rejected": {"duplicate": 1, "near_duplicate": 1}}
    assert report["against"] == {"files": [str(train)], "remembered": 2}
    assert [json.loads(x) for x in out.read_text().splitlines()] == [rows[2]]  # train's records are not written


def test_missing_datasketch_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasketch":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match="pip install datasketch"):
        dedup_mod.Deduper(DedupConfig(inputs=["-"], method="near"))
    assert dedup_mod.Deduper(DedupConfig(inputs=["-"], method="exact")).check("x") is None
