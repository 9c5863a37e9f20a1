"""Metrics that training and evaluation both report.

Bits per byte (:func:`bits_per_byte`, :func:`token_byte_lengths`): the summed next-token loss in
nats / ln 2 / the UTF-8 bytes of the predicted tokens, a tokenizer-independent measure; special
tokens (document separators) count as zero bytes, as in nanochat. The pretraining objective logs
it as ``val_bpb``; ``lmforge eval`` perplexity as ``bits_per_byte``.

Classification metrics: accuracy, precision/recall/F1 (per class, macro, micro, weighted), the
confusion matrix, a PNG of it and a Markdown summary.

The definitions follow scikit-learn's ``classification_report`` / ``f1_score`` with
``zero_division=0``: a class never predicted has precision 0, a class absent from ``y_true``
has recall 0 (and support 0, so it does not move the weighted F1, but it does count in the
macro average, as in scikit-learn when ``labels`` lists it). For single-label classification
micro-F1 equals accuracy. Pure numpy.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError


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


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_matrix(y_true: list[int], y_pred: list[int], n_labels: int) -> np.ndarray:
    """``(n_labels, n_labels)`` counts, rows = true label, columns = predicted label."""
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_report(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Metrics of predicted label ids against true ones (ids index ``labels``).

    Returns ``{"n", "labels", "accuracy", "macro_precision", "macro_recall", "macro_f1",
    "micro_f1", "weighted_f1", "per_class": {label: {"precision", "recall", "f1", "support"}},
    "confusion": [[...], ...]}`` (confusion rows = true labels, columns = predictions);
    JSON-serialisable."""
    if len(y_true) != len(y_pred):
        raise DataError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise DataError("no predictions to score")
    if not labels:
        raise DataError("no labels given")
    n_labels = len(labels)
    for name, ys in (("true label", y_true), ("prediction", y_pred)):
        bad = [y for y in ys if not isinstance(y, (int, np.integer)) or not 0 <= y < n_labels]
        if bad:
            raise DataError(f"{name} {bad[0]!r} is not a label id in 0..{n_labels - 1}")
    cm = confusion_matrix(y_true, y_pred, n_labels)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = len(y_true)
    micro_p = tp.sum() / predicted.sum()
    micro_r = tp.sum() / support.sum()
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r > 0 else 0.0
    return {
        "n": n,
        "labels": list(labels),
        "accuracy": float(tp.sum() / n),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "micro_f1": float(micro_f1),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": cm.tolist(),
    }


def figure_size(n_labels: int) -> tuple[float, float]:
    """Inches of the confusion-matrix figure (100 dpi): grows with the label count."""
    side = float(min(16.0, max(5.0, 2.5 + 0.55 * n_labels)))
    return side + 1.0, side


def plot_confusion_matrix(
    report: dict[str, Any], path: str | os.PathLike[str], title: str = "Confusion matrix", dpi: int = 100
) -> Path:
    """A PNG of ``report["confusion"]``: counts in the cells, colour by the row's share (recall),
    true labels down, predicted labels across. Its size is :func:`figure_size` x ``dpi``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    labels = report["labels"]
    cm = np.asarray(report["confusion"], dtype=np.int64)
    n = len(labels)
    rows = cm.sum(axis=1, keepdims=True)
    share = _safe_div(cm.astype(np.float64), np.broadcast_to(rows, cm.shape).astype(np.float64))
    fig = Figure(figsize=figure_size(n), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's examples")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc, mf1 = report.get("accuracy"), report.get("macro_f1")
    subtitle = f"\naccuracy {acc:.3f}, macro-F1 {mf1:.3f}, n={report.get('n', int(cm.sum()))}" if acc is not None else ""
    ax.set_title(title + subtitle)
    fontsize = 10 if n <= 10 else 8 if n <= 20 else 6
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if share[i, j] > 0.5 else "black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def format_report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the averages, a per-class table and the confusion matrix."""
    lines = [
        f"n = {report['n']:,}; accuracy {report['accuracy']:.4f}; macro-F1 {report['macro_f1']:.4f}; "
        f"micro-F1 {report['micro_f1']:.4f}; weighted-F1 {report['weighted_f1']:.4f}",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, m in report["per_class"].items():
        lines.append(f"| {label} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    lines.append(
        f"| **macro avg** | {report['macro_precision']:.4f} | {report['macro_recall']:.4f} | "
        f"{report['macro_f1']:.4f} | {report['n']} |"
    )
    labels = report["labels"]
    lines += ["", "Confusion matrix (rows = true, columns = predicted):", ""]
    lines.append("| true \\ predicted | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---:|" * len(labels))
    for label, row in zip(labels, report["confusion"]):
        lines.append(f"| {label} | " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
