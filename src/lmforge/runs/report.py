"""Report cards: one ``report.md`` per training or evaluation run, with its plots and config.

:func:`write_report` writes ``out_dir/report.md``: a title and date, a summary table, the
curves drawn from the run's ``metrics.jsonl`` (rows ``{"step", "kind", <metrics>}`` written by
:class:`lmforge.runs.tracking.RunLogger`) into ``out_dir/plots/``, the caller's figures and
tables, and the run's config as YAML. Every link is relative, so the folder can be moved.

A plot that cannot be drawn never fails the run: the report is written without it and one
warning names what was skipped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ..fileio import atomic_write_text

PathLike = str | os.PathLike

DPI = 100
LOSS_SIZE = (8.0, 4.5)  # inches: 800 x 450 px at DPI
LR_SIZE = (8.0, 3.0)  # 800 x 300 px
PANEL_SIZE = (4.0, 3.0)  # one small multiple: 400 x 300 px
PANEL_COLS = 3
MAX_PANELS = 30  # more metrics than this: the first ones, and a warning

LOSS_KEYS = {"train": "loss", "eval": "val_loss"}  # drawn on the loss plot
SKIP_KEYS = {"step", "kind", "time"}


# ---------------------------------------------------------------------------- metrics.jsonl
def read_metrics(metrics_file: PathLike | None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (unreadable lines skipped); [] when there is no file."""
    if metrics_file is None or not Path(metrics_file).is_file():
        return []
    rows = []
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric of one kind, in step order; a step logged twice (a resumed
    run) keeps its last value."""
    points: dict[float, float] = {}
    for r in rows:
        if r.get("kind") == kind and _number(r.get(key)):
            points[r["step"]] = float(r[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def metric_names(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every (kind, key) with a numeric value, train first, then eval, then other kinds, each
    in first-logged order."""
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        kind = str(r.get("kind", ""))
        for k, v in r.items():
            if k not in SKIP_KEYS and _number(v):
                seen.setdefault((kind, k), None)
    order = {"train": 0, "eval": 1}
    return sorted(seen, key=lambda kk: order.get(kk[0], 2))


def _dropouts(config: dict | None) -> list[str]:
    """The dropout settings above zero in a run's config (model.dropout, peft.dropout)."""
    found = []
    for section in ("model", "peft"):
        value = ((config or {}).get(section) or {}).get("dropout")
        if _number(value) and value > 0:
            found.append(f"{section}.dropout={value:g}")
    return found


def loss_gap_note(rows: list[dict[str, Any]], config: dict | None = None) -> str | None:
    """Why the held-out loss ends below the training loss, when it does (None otherwise): the
    question every reader of such a curve asks, answered from the run's own settings."""
    t_steps, train = series(rows, "train", LOSS_KEYS["train"])
    v_steps, val = series(rows, "eval", LOSS_KEYS["eval"])
    if not train or not val:
        return None
    last = v_steps[-1]
    before = [i for i, s in enumerate(t_steps) if s <= last]
    if not before or val[-1] >= train[before[-1]]:
        return None
    i = before[-1]
    window = t_steps[i] - (t_steps[i - 1] if i else 0)
    reasons = [
        f"the train loss at step {int(t_steps[i])} is the mean over the {int(window)} step(s) before it, each "
        f"measured before its update, while the val loss is measured after step {int(last)} with the final weights"
    ]
    drops = _dropouts(config)
    if drops:
        reasons.append(f"dropout ({', '.join(drops)}) is active while training and off while evaluating")
    reasons.append("the held-out examples are other examples than the training ones (a small held-out set, or one "
                   "of shorter or more regular texts, can score lower)")
    return (f"**Why the val loss ({val[-1]:.4f}) is below the train loss ({train[i]:.4f}):** "
            + "; ".join(reasons) + ". It is not, by itself, a sign of a bug or of leaked data.")


# ----------------------------------------------------------------------------------- plots
def _figure(size: tuple[float, float]):
    # a bare Figure draws on the Agg canvas, without pyplot's global state or backend switch
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)  # no tight bbox: the size stays figsize x DPI
    return path


def _line(ax, steps, values, label: str | None = None, **kw) -> None:
    marker = "o" if len(steps) <= 30 else None  # a lone point (or few evals) stays visible
    ax.plot(steps, values, marker=marker, markersize=3.5, lw=1.2, label=label, **kw)


def plot_loss(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Train and held-out loss against step; None when neither was logged."""
    train = series(rows, "train", LOSS_KEYS["train"])
    val = series(rows, "eval", LOSS_KEYS["eval"])
    if not train[0] and not val[0]:
        return None
    fig = _figure(LOSS_SIZE)
    ax = fig.add_subplot()
    if train[0]:
        _line(ax, *train, label="train loss")
    if val[0]:
        _line(ax, *val, label="val loss", color="tab:orange")
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lr(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The learning rate against step; None when it was not logged."""
    steps, lrs = series(rows, "train", "lr")
    if not steps:
        return None
    fig = _figure(LR_SIZE)
    ax = fig.add_subplot()
    _line(ax, steps, lrs, color="tab:green")
    ax.set_title("Learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Small multiples of every other numeric metric (grad norm, tokens/s, eval metrics, ...);
    None when there are none. PANEL_COLS panels a row, each PANEL_SIZE."""
    names = [(kind, key) for kind, key in metric_names(rows) if not (LOSS_KEYS.get(kind) == key or (kind, key) == ("train", "lr"))]
    if not names:
        return None
    if len(names) > MAX_PANELS:
        warnings.warn(f"report: {len(names)} metrics; plotting the first {MAX_PANELS}", RuntimeWarning, stacklevel=3)
        names = names[:MAX_PANELS]
    cols = min(PANEL_COLS, len(names))
    nrows = -(-len(names) // cols)
    fig = _figure((PANEL_SIZE[0] * cols, PANEL_SIZE[1] * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    colors = {"train": "tab:blue", "eval": "tab:orange"}
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    pad = max(0.5, 0.03 * (last - first))  # one step range for every panel, even a one-point one
    for i, (kind, key) in enumerate(names):
        ax = axes[i // cols][i % cols]
        _line(ax, *series(rows, kind, key), color=colors.get(kind, "tab:purple"))
        ax.set_xlim(first - pad, last + pad)
        ax.set_title(f"{kind}: {key}", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(key, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for j in range(len(names), nrows * cols):
        axes[j // cols][j % cols].set_axis_off()
    fig.suptitle("Logged metrics")
    return _save(fig, path)


def plot_run(metrics_file: PathLike | None, plots_dir: PathLike) -> tuple[list[tuple[str, Path]], list[str]]:
    """The run's curves as PNGs in ``plots_dir``: ([(caption, path)], [what failed]). Plots
    without data are left out; a plot that raises is reported in the second list."""
    rows = read_metrics(metrics_file)
    made: list[tuple[str, Path]] = []
    failed: list[str] = []
    if not rows:
        return made, failed
    plots_dir = Path(plots_dir)
    jobs = [
        ("Loss: train and held-out", plot_loss, "loss.png"),
        ("Learning rate", plot_lr, "lr.png"),
        ("Other logged metrics", plot_metrics, "metrics.png"),
    ]
    for caption, plot, name in jobs:
        try:
            path = plot(rows, plots_dir / name)
        except Exception as e:  # noqa: BLE001 - a plot must never fail the run
            failed.append(f"{name} ({type(e).__name__}: {e})")
            continue
        if path is not None:
            made.append((caption, path))
    return made, failed


# -------------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if len(v) <= 8 else f"{len(v)} items"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as tables: held-out metrics ``before`` -> ``after`` when both are given,
    then every other entry (nested dicts flattened to dotted keys)."""
    parts = []
    before, after = summary.get("before"), summary.get("after")
    rest = dict(summary)
    if isinstance(before, dict) and isinstance(after, dict) and (before or after):
        rest.pop("before"), rest.pop("after")
        lines = ["| held-out metric | before | after | change |", "|---|---:|---:|---:|"]
        for key in list(dict.fromkeys([*before, *after])):
            b, a = before.get(key), after.get(key)
            change = f"{a - b:+.4f}" if _number(a) and _number(b) else "-"
            lines.append(f"| {key} | {_fmt(b)} | {_fmt(a)} | {change} |")
        parts.append("\n".join(lines))
    items = _flatten(rest)
    if items:
        parts.append("\n".join(["| | |", "|---|---:|", *(f"| {k} | {_fmt(v)} |" for k, v in items)]))
    return "\n\n".join(parts)


def _summary_from_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of each metric, for a report given no summary."""
    last: dict[str, Any] = {}
    for kind, key in metric_names(rows):
        steps, values = series(rows, kind, key)
        if steps:
            last[f"{kind}.{key} (step {int(steps[-1])})"] = values[-1]
    return last


def _link(target: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out_dir.resolve())).as_posix()


def _place_figure(path: Path, out_dir: Path, plots_dir: Path) -> Path:
    """``path`` itself when it lies inside ``out_dir``, else a copy in ``plots_dir``."""
    resolved, root = path.resolve(), out_dir.resolve()
    if resolved == root or root in resolved.parents:
        return path
    plots_dir.mkdir(parents=True, exist_ok=True)
    dest = plots_dir / path.name
    n = 1
    while dest.exists() and not dest.samefile(path):
        dest = plots_dir / f"{path.stem}-{n}{path.suffix}"
        n += 1
    shutil.copyfile(path, dest)
    return dest


def write_report(
    out_dir: PathLike,
    *,
    title: str,
    config: dict | None = None,
    summary: dict | None = None,
    metrics_file: PathLike | None = None,
    figures: Sequence[tuple[str, PathLike]] = (),
    tables: Sequence[tuple[str, str]] = (),
    notes: str = "",
) -> Path:
    """Write ``out_dir/report.md`` (plots in ``out_dir/plots/``) and return its path.

    ``summary``: key metrics (nested dicts flattened; ``before``/``after`` dicts become one
    comparison table); default: the last logged value of each metric in ``metrics_file``.
    ``metrics_file``: a run's metrics.jsonl, drawn as loss, learning-rate and other-metric plots.
    ``figures``: (caption, PNG path) pairs; files outside ``out_dir`` are copied into plots/.
    ``tables``: (title, markdown) pairs. ``config``: shown as YAML.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = out_dir / "plots"
    made, failed = plot_run(metrics_file, plots_dir)
    for caption, fig in figures:
        fig = Path(fig)
        if not fig.is_file():
            failed.append(f"{fig} (no such file)")
            continue
        try:
            made.append((caption, _place_figure(fig, out_dir, plots_dir)))
        except OSError as e:
            failed.append(f"{fig} ({e})")
    if failed:
        warnings.warn("report: left out " + "; ".join(failed), RuntimeWarning, stacklevel=2)

    if summary is None:
        summary = _summary_from_metrics(read_metrics(metrics_file))
    lines = [f"# {title}", "", f"Written {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}.", ""]
    if notes:
        lines += [notes.strip(), ""]
    if summary:
        lines += ["## Summary", "", summary_markdown(summary), ""]
    if made:
        lines += ["## Plots", ""]
        for caption, path in made:
            lines += [f"![{caption}]({_link(path, out_dir)})", "", f"*{caption}*", ""]
    gap = loss_gap_note(read_metrics(metrics_file), config) if metrics_file is not None else None
    if gap:
        lines += [gap, ""]
    for table_title, markdown in tables:
        lines += [f"## {table_title}", "", markdown.strip(), ""]
    if metrics_file is not None and Path(metrics_file).is_file():
        lines += [f"Every logged value: [`{Path(metrics_file).name}`]({_link(Path(metrics_file), out_dir)}).", ""]
    if config:
        plain = json.loads(json.dumps(config, default=str))  # paths, enums, ... as text
        dumped = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False)
        lines += ["## Config", "", "```yaml", dumped.rstrip(), "```", ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))
