"""Report cards (`lmforge.runs.report`): report.md with relative links to real PNGs, written by
every training run (pretrain, finetune with its confusion matrix; the quickstart's: tests/test_quickstart.py)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_llama

from lmforge.cli import main
from lmforge.runs import report as report_mod
from lmforge.runs.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_real_image(path: Path, size: tuple[int, int]) -> None:
    """A PNG of exactly ``size`` pixels (width, height) that matplotlib reads, not one colour."""
    from matplotlib.image import imread

    assert png_size(path) == size
    img = imread(path)
    assert img.shape[:2] == (size[1], size[0])
    assert img[..., :3].std() > 0.02, f"{path} is (nearly) a single colour"


def image_links(report: Path) -> dict[str, Path]:
    """{link text: resolved file} of every image in a report; every link is relative."""
    links = IMAGE_LINK.findall(report.read_text())
    for link in links:
        assert not Path(link).is_absolute() and "://" not in link, link
    return {link: (report.parent / link) for link in links}


def px(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * report_mod.DPI), round(inches[1] * report_mod.DPI)


def synthetic_metrics(path: Path) -> Path:
    rows = []
    for step in range(1, 41):
        rows.append({"step": step, "kind": "train", "time": 0.0, "loss": 3.0 / step**0.3, "lr": 1e-3 * min(1, step / 5),
                     "grad_norm": 1.0 + 0.1 * (step % 3), "tokens_per_s": 1000.0 + step})
    for step in (10, 20, 30, 40):
        rows.append({"step": step, "kind": "eval", "time": 0.0, "val_loss": 3.2 / step**0.3,
                     "val_accuracy": step / 50, "val_macro_f1": step / 60})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ unit tests
def test_write_report_links_every_plot_with_readable_images(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    metrics = synthetic_metrics(run / "metrics.jsonl")
    # a caller's figure outside the run directory: copied in so the folder stays self-contained
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2), dpi=100)
    fig.add_subplot().plot([0, 1, 2], [2, 0, 1])
    outside = tmp_path / "elsewhere" / "extra.png"
    outside.parent.mkdir()
    fig.savefig(outside)
    config = {"model": {"n_layer": 2, "n_embd": 32}, "train": {"lr": 0.001, "max_steps": 40}, "data": "runs/x"}
    summary = {"steps": 40, "tokens_per_s": 1040.5, "before": {"val_loss": 3.2}, "after": {"val_loss": 1.06},
               "data": {"train": {"kept": 90}}}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        report = write_report(run, title="Synthetic run", config=config, summary=summary, metrics_file=metrics,
                              figures=[("Extra figure", outside)], tables=[("A table", "| a | b |\n|---|---|\n| 1 | 2 |")],
                              notes="Some notes.")
    assert report == run / "report.md"
    text = report.read_text()
    assert text.startswith("# Synthetic run\n") and "Some notes." in text
    assert "| val_loss | 3.2000 | 1.0600 | -2.1400 |" in text  # before -> after
    assert "| data.train.kept | 90 |" in text and "| tokens_per_s | 1,040.5 |" in text
    assert "## A table\n\n| a | b |" in text
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL).group(1)
    assert yaml.safe_load(block) == config

    links = image_links(report)
    assert list(links) == ["plots/loss.png", "plots/lr.png", "plots/metrics.png", "plots/extra.png"]
    assert_real_image(links["plots/loss.png"], px(report_mod.LOSS_SIZE))
    assert_real_image(links["plots/lr.png"], px(report_mod.LR_SIZE))
    # grad_norm, tokens_per_s, val_accuracy, val_macro_f1: 4 panels, 3 a row -> 2 rows of 3
    w, h = report_mod.PANEL_SIZE
    assert_real_image(links["plots/metrics.png"], px((3 * w, 2 * h)))
    assert_real_image(links["plots/extra.png"], (300, 200))

    # every link is relative: the folder can be moved and still shows its pictures
    moved = shutil.move(str(run), str(tmp_path / "moved"))
    for path in image_links(Path(moved) / "report.md").values():
        assert path.is_file()


def test_metrics_panel_counts_every_other_metric(tmp_path: Path) -> None:
    rows = [{"step": s, "kind": k, key: float(s)} for s in (1, 2) for k, key in
            [("train", "loss"), ("train", "lr"), ("train", "a"), ("eval", "b"), ("test", "c")]]
    # a resumed run logs a step twice: the later value wins
    rows.append({"step": 2, "kind": "train", "a": 7.0})
    assert report_mod.series(rows, "train", "a") == ([1, 2], [1.0, 7.0])
    assert report_mod.metric_names(rows) == [("train", "loss"), ("train", "lr"), ("train", "a"), ("eval", "b"), ("test", "c")]
    out = report_mod.plot_metrics(rows, tmp_path / "m.png")
    w, h = report_mod.PANEL_SIZE
    assert_real_image(out, px((3 * w, h)))  # a, b, c: one row of three


def test_report_without_data_and_with_a_failing_plot(tmp_path: Path, monkeypatch) -> None:
    # no metrics file: a report with the summary and config, no plots, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = write_report(tmp_path / "empty", title="Empty", config={"a": Path("x/y")}, summary={"steps": 0},
                              metrics_file=tmp_path / "missing.jsonl")
    assert "## Plots" not in report.read_text() and "| steps | 0 |" in report.read_text()
    assert "```yaml\na: x/y\n```" in report.read_text()  # a config with non-YAML values still shows
    assert not (tmp_path / "empty" / "plots").exists()

    # a plot that raises is left out with one warning; the other plots and the report are written
    run = tmp_path / "run"
    run.mkdir()
    synthetic_metrics(run / "metrics.jsonl")

    def broken(rows, path):
        raise ValueError("no luck")

    monkeypatch.setattr(report_mod, "plot_lr", broken)
    with pytest.warns(RuntimeWarning, match=r"lr.png \(ValueError: no luck\).*missing.png \(no such file\)") as caught:
        report = write_report(run, title="Partly", metrics_file=run / "metrics.jsonl",
                              figures=[("gone", tmp_path / "missing.png")])
    assert len(caught) == 1
    assert list(image_links(report)) == ["plots/loss.png", "plots/metrics.png"]
    assert "val_accuracy (step 40)" in report.read_text()  # no summary given: the last logged values


def test_val_loss_below_train_loss_is_explained(tmp_path: Path) -> None:
    """A card that shows the held-out loss ending below the training loss says why (and one
    whose val stays above says nothing)."""
    def card(val: float) -> str:
        run = tmp_path / f"run{val}"
        run.mkdir()
        rows = [{"step": s, "kind": "train", "loss": 2.0 - 0.01 * s} for s in (5, 10, 15, 20)]
        rows.append({"step": 20, "kind": "eval", "val_loss": val})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return write_report(run, title="t", metrics_file=run / "metrics.jsonl",
                            config={"peft": {"method": "lora", "dropout": 0.05}, "model": {"dropout": 0.0}}).read_text()

    below = card(1.5)
    assert "Why the val loss (1.5000) is below the train loss (1.8000)" in below
    assert "mean over the 5 step(s) before it" in below and "peft.dropout=0.05" in below
    assert "model.dropout" not in below.split("Why the val loss")[1].split("\n")[0]
    assert "Why the val loss" not in card(1.9)


# ---------------------------------------------------------------- finetune: classification
def test_classify_finetune_report_has_confusion_matrix_and_metrics(tiny_data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.runs.metrics import figure_size

    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=64, init_std=0.05)
    rows = [{"text": f"{label[0] * (3 + i % 5)} road", "label": label}
            for i, label in enumerate(["north", "south", "east"] * 16)]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:36]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[36:]))
    out = tmp_path / "cls"
    assert main(["finetune", f"base={base}", f"out_dir={out}", "objective=classify", f"data.train=[{train}]",
                 f"data.val=[{val}]", "train.max_steps=6", "train.eval_interval=3", "train.log_interval=1",
                 "train.micro_batch_size=12", "train.lr=5e-3", "train.threads=1", "train.device=cpu",
                 "train.precision=fp32", "log.console=false", "log.tensorboard=true", "peft.method=lora",
                 "peft.r=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    report = Path(summary["report"])
    assert report == out / "report.md"
    text = report.read_text()
    assert text.startswith("# Fine-tuning run cls: classify (lora)")
    for row in ("| trainable_percent |", "| tokens_per_s |", "| peak_rss_mib |", "| classification.macro_f1 |",
                "| val_accuracy |"):  # the last: held-out before -> after
        assert row in text, row
    assert "## Held-out classification report" in text and "| label | precision | recall | F1 | support |" in text
    links = image_links(report)
    # the confusion matrix already lies in the run directory: linked, not copied
    assert set(links) == {"plots/loss.png", "plots/lr.png", "plots/metrics.png", "confusion_matrix.png"}
    assert_real_image(links["confusion_matrix.png"], px(figure_size(3)))
    assert_real_image(links["plots/loss.png"], px(report_mod.LOSS_SIZE))
    assert_real_image(links["plots/metrics.png"], px((3 * report_mod.PANEL_SIZE[0], 2 * report_mod.PANEL_SIZE[1])))

    # the eval metrics logged at eval steps reach TensorBoard too
    acc = EventAccumulator(str(next((out / "tb").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert {"eval/val_accuracy", "eval/val_macro_f1", "train/loss", "train/lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/val_accuracy")] == [3, 6]
