"""Robustness evaluation: seeded perturbations, perplexity and accuracy against noise rate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE, TINY_PRETRAIN

from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.eval.robustness import (
    KINDS,
    evaluate_robustness,
    perturb_texts,
    text_perplexity,
)
from lmforge.tokenizer import Tokenizer
from lmforge.checkpoint import load_model

TEXTS = [" ".join(f"w{i}_{j}" for j in range(200)) for i in range(5)]


@pytest.mark.parametrize("kind", KINDS)
def test_perturbation_is_seeded_and_rate_zero_is_identity(kind):
    assert perturb_texts(TEXTS, kind, 0.0, seed=3) == TEXTS
    a = perturb_texts(TEXTS, kind, 0.3, seed=3)
    assert a == perturb_texts(TEXTS, kind, 0.3, seed=3)
    assert a != perturb_texts(TEXTS, kind, 0.3, seed=4)
    assert all(x != t for x, t in zip(a, TEXTS))
    # a text's noise depends on its position and the seed only, not on the texts after it
    assert perturb_texts(TEXTS[:3], kind, 0.3, seed=3) == a[:3]


@pytest.mark.parametrize(("kind", "rate"), [("delete", 0.1), ("delete", 0.4), ("mask", 0.25), ("typo", 0.2), ("swap", 0.3)])
def test_rate_sets_the_expected_fraction(kind, rate):
    words = sum(len(t.split()) for t in TEXTS)
    noisy = perturb_texts(TEXTS, kind, rate, seed=0, mask_token="<m>")
    if kind == "delete":
        hit = 1 - sum(len(t.split()) for t in noisy) / words
    elif kind == "mask":
        hit = sum(t.split().count("<m>") for t in noisy) / words
    elif kind == "swap":
        moved = sum(a != b for t, n in zip(TEXTS, noisy) for a, b in zip(t.split(), n.split()))
        hit = moved / words / 2  # a swap moves two words; a word can be swapped once, so the rate is per pair start
    else:
        chars = sum(len(t.replace(" ", "")) for t in TEXTS)
        # a replacement letter equals the original 1 time in 26 (digits and '_' never do)
        hit = sum(a != b for t, n in zip(TEXTS, noisy) for a, b in zip(t, n)) / chars
    # 1000 words / ~7000 characters: within 4 binomial standard deviations
    n = words if kind != "typo" else sum(len(t.replace(" ", "")) for t in TEXTS)
    tol = 4 * (rate * (1 - rate) / n) ** 0.5
    if kind == "swap":  # a swap consumes the next position: the expected share of swapped pairs is r / (1 + r)
        assert hit == pytest.approx(rate / (1 + rate), abs=tol)
    else:
        assert hit == pytest.approx(rate, abs=tol)


def test_higher_rates_hit_a_superset():
    lo, hi = perturb_texts(TEXTS, "mask", 0.1, seed=1, mask_token="#"), perturb_texts(TEXTS, "mask", 0.3, seed=1, mask_token="#")
    for a, b in zip(lo, hi):
        assert all(y == "#" for x, y in zip(a.split(), b.split()) if x == "#")


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "0.2", True])
def test_bad_rates_and_kinds_are_errors(rate):
    with pytest.raises(ConfigError, match="noise rate must be a number in"):
        perturb_texts(TEXTS, "delete", rate)


def test_bad_kind_and_inputs_are_errors(tiny_checkpoint):
    with pytest.raises(ConfigError, match="unknown perturbation 'shuffle'"):
        perturb_texts(TEXTS, "shuffle", 0.1)
    with pytest.raises(ConfigError, match="noise rate"):
        evaluate_robustness(tiny_checkpoint, texts=["to be or not"], rates=[0.0, 2.0])
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_robustness(tiny_checkpoint)
    with pytest.raises(ConfigError, match="no classification head"):
        evaluate_robustness(tiny_checkpoint, texts=["a b", "c d"], labels=["x", "y"], method="head")


@pytest.fixture(scope="module")
def trained_char_model(tiny_data, tmp_path_factory) -> Path:
    from lmforge.train.pretrain import PretrainConfig, run_pretrain

    out = tmp_path_factory.mktemp("rob") / "run"
    run_pretrain(load_config(PretrainConfig, "pretrain", None, [
        *TINY_PRETRAIN, f"data={tiny_data}", f"out_dir={out}", "train.max_steps=60", "train.lr=1e-2"]))
    return out


def test_perplexity_rises_with_typo_noise_and_files_are_written(trained_char_model, tmp_path):
    lines = SHAKESPEARE.read_text(encoding="utf-8")[20_000:26_000].split("\n\n")
    r = evaluate_robustness(trained_char_model, texts=lines, kind="typo", rates=[0.3, 0.0, 0.1], seed=0,
                            out_dir=tmp_path)
    assert [row["rate"] for row in r["rows"]] == [0.0, 0.1, 0.3]
    model, ckpt = load_model(trained_char_model)
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    clean = text_perplexity(model, tok, lines)
    assert r["rows"][0]["ppl"] == pytest.approx(clean["ppl"], rel=1e-5) and r["rows"][0]["changed"] == 0.0
    ppl = [row["ppl"] for row in r["rows"]]
    assert ppl[0] < ppl[1] < ppl[2]  # a trained model finds typo'd text less likely
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["rows"] == r["rows"] and (tmp_path / "robustness.png").stat().st_size > 0
    assert "| typo rate |" in (tmp_path / "robustness.md").read_text()


def test_perplexity_matches_the_model_loss(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    tok = Tokenizer.from_file(Path(tiny_checkpoint) / "tokenizer.json")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:15]  # shorter than the 16-token context: one window
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        expected = float(model(ids[:, :-1], ids[:, 1:]))
    assert text_perplexity(model, tok, [text])["loss"] == pytest.approx(expected, rel=1e-5)


def test_accuracy_by_a_classification_head_falls_with_deletions(tiny_data, tmp_path):
    from conftest import save_tiny_llama

    from lmforge.train.finetune import FinetuneConfig, run_finetune

    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=64, init_std=0.05)
    rng = random.Random(0)
    rows = [{"text": f"{lab[0] * rng.randint(3, 8)} road", "label": lab} for lab in ["north", "south", "east"] * 40]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:90]))
    cfg = load_config(FinetuneConfig, "finetune", None, [
        f"base={base}", f"out_dir={tmp_path / 'cls'}", "objective=classify", f"data.train=[{tmp_path / 'train.jsonl'}]",
        "data.val_fraction=0.1", "train.max_steps=40", "train.lr=5e-3", "train.micro_batch_size=16",
        "train.eval_interval=0", "log.console=false", "log.tensorboard=false", "train.threads=1", "train.device=cpu",
        "train.precision=fp32"])
    run_finetune(cfg)
    test = rows[90:]
    r = evaluate_robustness(tmp_path / "cls", texts=[x["text"] for x in test], labels=[x["label"] for x in test],
                            kind="delete", rates=[0.0, 0.9])
    assert r["method"] == "head" and r["metric"] == "accuracy"
    clean, noisy = r["rows"]
    assert clean["accuracy"] == 1.0
    # at 0.9 most two-word texts keep one word at random: "road" alone carries no label
    assert noisy["accuracy"] < 0.9 and 0.3 < noisy["changed"] <= 1.0
