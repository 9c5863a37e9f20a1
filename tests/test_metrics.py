"""Classification metrics against hand-computed values; the confusion-matrix PNG; Markdown."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.runs.metrics import (
    classification_report,
    figure_size,
    format_report_markdown,
    plot_confusion_matrix,
)

LABELS = ["cat", "dog", "fox"]
# true:  cat cat cat dog dog fox fox fox fox
# pred:  cat dog cat dog cat fox fox cat dog
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 1, 0, 1, 0, 2, 2, 0, 1]


def test_hand_computed_report() -> None:
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert r["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 1, 2]]
    # cat: tp 2, predicted 4, support 3 -> P 1/2, R 2/3, F1 4/7
    # dog: tp 1, predicted 3, support 2 -> P 1/3, R 1/2, F1 2/5
    # fox: tp 2, predicted 2, support 4 -> P 1,   R 1/2, F1 2/3
    cat, dog, fox = (r["per_class"][k] for k in LABELS)
    assert cat == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert dog == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert fox == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4})
    assert r["accuracy"] == pytest.approx(5 / 9)
    assert r["micro_f1"] == pytest.approx(5 / 9)
    assert r["macro_f1"] == pytest.approx((4 / 7 + 2 / 5 + 2 / 3) / 3)
    assert r["weighted_f1"] == pytest.approx((3 * 4 / 7 + 2 * 2 / 5 + 4 * 2 / 3) / 9)
    assert r["macro_precision"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    assert r["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert r["n"] == 9 and r["labels"] == LABELS


def test_zero_division_and_absent_classes() -> None:
    # "fox" is never true and never predicted; "dog" is true but never predicted
    r = classification_report([0, 0, 1], [0, 0, 0], LABELS)
    assert r["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["per_class"]["fox"]["support"] == 0 and r["per_class"]["fox"]["f1"] == 0.0
    cat_f1 = 2 * (2 / 3) * 1 / (2 / 3 + 1)  # P 2/3, R 1
    assert r["macro_f1"] == pytest.approx(cat_f1 / 3)
    assert r["weighted_f1"] == pytest.approx(2 * cat_f1 / 3)
    perfect = classification_report([0, 1, 2], [0, 1, 2], LABELS)
    assert perfect["macro_f1"] == perfect["accuracy"] == 1.0


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="2 true labels but 1 predictions"):
        classification_report([0, 1], [0], LABELS)
    with pytest.raises(DataError, match="not a label id"):
        classification_report([0, 3], [0, 1], LABELS)
    with pytest.raises(DataError, match="no predictions"):
        classification_report([], [], LABELS)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_confusion_png(tmp_path: Path) -> None:
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    out = plot_confusion_matrix(r, tmp_path / "sub" / "cm.png", title="toy")
    assert out.is_file() and out.stat().st_size > 5000
    w, h = figure_size(3)
    assert _png_size(out) == (round(w * 100), round(h * 100))
    many = [f"label number {i}" for i in range(15)]
    big = classification_report(list(range(15)) * 2, list(range(15)) + [0] * 15, many)
    out2 = plot_confusion_matrix(big, tmp_path / "cm15.png")
    w2, h2 = figure_size(15)
    assert _png_size(out2) == (round(w2 * 100), round(h2 * 100)) and w2 > w


def test_markdown() -> None:
    md = format_report_markdown(classification_report(Y_TRUE, Y_PRED, LABELS))
    assert "accuracy 0.5556" in md
    assert "| dog | 0.3333 | 0.5000 | 0.4000 | 2 |" in md
    assert "| fox | 1 | 1 | 2 |" in md  # the confusion row of fox
