"""`lmforge eval`: checkpoints x tasks -> metrics, predictions, plots and a report card.

Every (checkpoint, task, shots) combination is one row of the results. Classification and
multiple-choice tasks run once per ``--shots`` value (zero- and few-shot side by side); a
checkpoint with a classification head for the task's labels (``lmforge finetune
objective=classify``) is evaluated through its head instead. Generation, chat and perplexity
tasks run once. The run directory gets:

- ``results.json``: every row (checkpoint, task, kind, method, metrics) and the settings;
- ``<task>/<row>.predictions.jsonl``: what the model predicted for each example;
- ``<task>/<row>.confusion.png`` (classification) and ``<task>/compare.png`` (rows side by side);
- ``metrics.jsonl`` and TensorBoard scalars (``eval/<task>/<metric>``; W&B with ``--wandb``);
- ``report.md``: the report card (:func:`lmforge.runs.report.write_report`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_json

#: The metrics shown in tables and plots, per task kind (all metrics go to results.json).
HEADLINE = {
    "classify": ("accuracy", "macro_f1", "micro_f1"),
    "multiple_choice": ("acc", "acc_norm"),
    "generate": ("exact_match", "f1", "rougeL", "bleu"),
    "chat": ("loss", "perplexity", "reply_tokens_mean", "distinct_1", "distinct_2", "identical_replies",
             "ended_with_eot"),
    "perplexity": ("perplexity", "bits_per_byte", "loss"),
}
_SHOT_KINDS = ("classify", "multiple_choice")


@dataclass
class EvalOptions:
    shots: list[int] = field(default_factory=lambda: [0])
    seed: int = 0
    limit: int | None = None  # a seeded sample of this many test examples a task (not perplexity)
    batch_size: int = 8
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 only where it is fast (lmforge env)
    max_length: int | None = None  # perplexity window (default: the task's, else the context)
    stride: int | None = None
    # wrap classification / multiple-choice / generation prompts in the checkpoint's chat template:
    # off (lm-evaluation-harness's default), on, or auto (when the checkpoint declares one); chat
    # tasks always use the template
    chat: str = "off"
    max_tokens: int | None = None  # generation / chat reply budget (default: the task's)
    threads: int | None = None
    wandb: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.shots or any(k < 0 for k in self.shots):
            raise ConfigError(f"--shots must list numbers of examples >= 0, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.chat not in ("auto", "on", "off"):
            raise ConfigError(f"--chat must be auto, on or off, got {self.chat!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be at least 1, got {self.max_tokens}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _has_chat_template(ckpt: Path, config: dict[str, Any], tokenizer: Any) -> bool:
    """Whether a checkpoint (``config``: its config.json) declares a chat template, or its
    vocabulary has ChatML's tokens."""
    if isinstance((config.get("tokenizer") or {}).get("chat_template"), str):
        return True
    if any((ckpt / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        if "chat_template" in json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8")):
            return True
    except (OSError, ValueError):
        pass
    return "<|im_start|>" in set(tokenizer.special_tokens)


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    chat_template: Any  # a ChatTemplate, or None for plain-text prompts
    config: dict[str, Any]
    _engine: Any = None

    def engine(self, batch_size: int):
        if self._engine is None:
            from ..infer.engine import InferenceEngine

            self._engine = InferenceEngine(self.model, self.tokenizer, max_batch_size=batch_size)
        return self._engine


def load_for_eval(checkpoint: str, opts: EvalOptions) -> LoadedModel:
    from ..checkpoint import Checkpoint

    ckpt = Checkpoint.open(checkpoint)
    model, path, config = ckpt.load_model(), ckpt.path, ckpt.config
    model.eval()
    tokenizer = ckpt.tokenizer()
    use_chat = opts.chat == "on" or (opts.chat == "auto" and _has_chat_template(path, config, tokenizer))
    template = ckpt.chat_template() if use_chat else None
    name = path.name
    if name.startswith("step_") and path.parent.name == "checkpoints":  # a run's checkpoint: the run's name
        name = path.parent.parent.name
    return LoadedModel(name, path, model, tokenizer, template, config)


# ----------------------------------------------------------------------------- task kinds
def _examples(task: Any, opts: EvalOptions) -> list[dict[str, Any]]:
    """The task's test examples; with ``--limit N`` a seeded sample of N of them (in file order:
    the first N of a file sorted by label would hold one label)."""
    import random

    examples = task.test().examples
    if opts.limit and opts.limit < len(examples):
        keep = sorted(random.Random(f"{opts.seed}:{task.name}").sample(range(len(examples)), opts.limit))
        examples = [examples[i] for i in keep]
    if not examples:
        raise DataError(f"task {task.name}: the test split {task.test_path} holds no usable example")
    return examples


def _autocast(opts: EvalOptions, model: torch.nn.Module):
    from ..hardware import autocast_dtype, resolve_precision

    device = next(model.parameters()).device
    dtype = autocast_dtype(resolve_precision(opts.precision, device, setting="--precision"))
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _head_labels(lm: LoadedModel, task: Any) -> bool:
    n = int(getattr(lm.model.config, "num_labels", 0) or 0)
    if not n:
        return False
    labels = lm.config.get("labels")
    if labels is not None and list(labels) != list(task.labels):
        raise ConfigError(
            f"{lm.path} has a classification head for the labels {labels}, not task {task.name}'s {task.labels}"
        )
    if n != len(task.labels):
        raise ConfigError(f"{lm.path} has a {n}-class head; task {task.name} has {len(task.labels)} labels")
    return True


@torch.inference_mode()
def classify_with_head(model: torch.nn.Module, tokenizer: Any, texts: list[str], template: str, batch_size: int) -> list[int]:
    """The head's predicted label index for every text (the text in the training template,
    cut to the model's context from the left, as the classification objective does)."""
    from ..data.encoding import encode_texts, pad_batch

    encoded, _ = encode_texts(tokenizer, texts, template, int(model.config.context_length))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pred = [0] * len(encoded)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        x, lengths = pad_batch([encoded[i] for i in chunk], pad, device)
        for i, p in zip(chunk, model(x, lengths=lengths).argmax(-1).tolist()):
            pred[i] = p
    return pred


def eval_classify(lm: LoadedModel, task: Any, opts: EvalOptions, out: Path) -> list[dict[str, Any]]:
    from ..runs.metrics import classification_report, plot_confusion_matrix
    from .prompting import classify_scores

    examples = _examples(task, opts)
    texts = [e["text"] for e in examples]
    index = {label: i for i, label in enumerate(task.labels)}
    true = [index[e["label"]] for e in examples]
    runs: list[tuple[str, int | None]] = (
        [("head", None)] if _head_labels(lm, task) else [(f"{k}-shot", k) for k in opts.shots]
    )
    rows = []
    for method, k in runs:
        start = time.perf_counter()
        with _autocast(opts, lm.model):
            if k is None:
                template = lm.config.get("classify_template") or "{text}"
                pred = classify_with_head(lm.model, lm.tokenizer, texts, template, opts.batch_size)
                prompts = [template.replace("{text}", t) for t in texts]
            else:
                scores, prompts = classify_scores(
                    lm.model, lm.tokenizer, texts, task.labels, pool=task.train() if k else None, k=k,
                    seed=opts.seed, chat_template=lm.chat_template, batch_size=opts.batch_size,
                    progress=opts.progress, **task.prompt_kwargs(),
                )
                pred = [int(i) for i in scores.argmax(axis=1)]
        seconds = time.perf_counter() - start
        report = classification_report(true, pred, task.labels)
        stem = _slug(f"{lm.name}.{method}")
        png = plot_confusion_matrix(report, out / f"{stem}.confusion.png", title=f"{task.name}: {lm.name}, {method}")
        preds = [
            {"index": i, "text": t, "label": e["label"], "pred": task.labels[p], "correct": p == y, "prompt": pr}
            for i, (t, e, p, y, pr) in enumerate(zip(texts, examples, pred, true, prompts))
        ]
        rows.append(_row(lm, task, method, k, report, seconds, preds, out, figures=[png]))
    return rows


def eval_multiple_choice(lm: LoadedModel, task: Any, opts: EvalOptions, out: Path) -> list[dict[str, Any]]:
    from .choice import choice_metrics, draw_shots, multiple_choice_scores

    examples = _examples(task, opts)
    rows = []
    for k in opts.shots:
        pool = task.train().examples if k else []
        shots = draw_shots(pool, k, opts.seed, exclude=[e["query"] for e in examples])
        start = time.perf_counter()
        with _autocast(opts, lm.model):
            scores, prompts = multiple_choice_scores(
                lm.model, lm.tokenizer, examples, template=task.template, shots=shots,
                chat_template=lm.chat_template, batch_size=opts.batch_size, progress=opts.progress,
            )
        seconds = time.perf_counter() - start
        metrics = choice_metrics(examples, scores)
        preds = [
            {"index": i, "answer": e["answer"], "pred": p, "pred_norm": q, "loglik": [round(float(x), 4) for x in s],
             "choices": e["choices"], "prompt": pr}
            for i, (e, p, q, s, pr) in enumerate(zip(examples, metrics.pop("pred"), metrics.pop("pred_norm"), scores, prompts))
        ]
        rows.append(_row(lm, task, f"{k}-shot", k, metrics, seconds, preds, out))
    return rows


def eval_generate(lm: LoadedModel, task: Any, opts: EvalOptions, out: Path) -> list[dict[str, Any]]:
    from .generation import evaluate_generation

    examples = _examples(task, opts)
    if task.template:
        examples = [
            {**e, "prompt": task.template.replace("{prompt}", e["prompt"])} if isinstance(e["prompt"], str) else e
            for e in examples
        ]
    start = time.perf_counter()
    result = evaluate_generation(
        lm.engine(opts.batch_size), examples, max_tokens=opts.max_tokens or task.max_tokens,
        chat=lm.chat_template is not None, chat_template=lm.chat_template, stop=task.stop,
        batch_size=opts.batch_size, progress=opts.progress,
    )
    seconds = time.perf_counter() - start
    return [_row(lm, task, "greedy", None, result["metrics"], seconds, result["predictions"], out)]


def eval_chat(lm: LoadedModel, task: Any, opts: EvalOptions, out: Path) -> list[dict[str, Any]]:
    from ..tokenizer.chat import ChatTemplate
    from .chat import assistant_loss, chat_replies, reference_metrics, reply_metrics

    conversations = _examples(task, opts)
    conversations = [c for c in conversations if "messages" in c]
    if not conversations:
        raise DataError(f"task {task.name}: chat evaluation needs conversations ({{\"messages\": [...]}})")
    template = lm.chat_template or ChatTemplate.from_checkpoint(lm.path)
    start = time.perf_counter()
    with _autocast(opts, lm.model):
        metrics = assistant_loss(lm.model, lm.tokenizer, template, conversations, batch_size=opts.batch_size,
                                 progress=opts.progress)
    replies = chat_replies(lm.engine(opts.batch_size), template, conversations,
                           max_tokens=opts.max_tokens or task.max_tokens, seed=opts.seed, progress=opts.progress)
    metrics.update(reply_metrics(replies))
    metrics.update(reference_metrics(replies))
    seconds = time.perf_counter() - start
    return [_row(lm, task, "greedy", None, metrics, seconds, replies, out)]


def eval_perplexity(lm: LoadedModel, task: Any, opts: EvalOptions, out: Path) -> list[dict[str, Any]]:
    from ..data.sources import DocumentStream
    from .perplexity import text_perplexity

    stream = DocumentStream([task.test_path])
    try:
        text = "\n\n".join(stream)
    except OSError as e:
        raise DataError(f"task {task.name}: cannot read {task.test_path}: {e}") from None
    lo, hi = task.span
    text = text[int(len(text) * lo) : int(len(text) * hi)]
    if not text.strip():
        raise DataError(f"task {task.name}: no text to score in {task.test_path} (span {lo}-{hi})")
    context = int(lm.model.config.context_length)
    max_length = min(opts.max_length or task.max_length or context, context)
    stride = opts.stride or task.stride or max(1, max_length // 2)
    if stride > max_length:
        raise ConfigError(f"the stride ({stride}) must not exceed the window length ({max_length})")
    start = time.perf_counter()
    metrics = text_perplexity(lm.model, lm.tokenizer, text, max_length=max_length, stride=stride,
                              batch_size=opts.batch_size, precision=opts.precision, progress=opts.progress)
    metrics["characters"] = len(text)
    seconds = time.perf_counter() - start
    return [_row(lm, task, f"window {max_length}/{stride}", None, metrics, seconds, [], out)]


RUNNERS = {
    "classify": eval_classify,
    "multiple_choice": eval_multiple_choice,
    "generate": eval_generate,
    "chat": eval_chat,
    "perplexity": eval_perplexity,
}


def _row(lm: LoadedModel, task: Any, method: str, k: int | None, metrics: dict[str, Any], seconds: float,
         predictions: list[dict[str, Any]], out: Path, figures: list[Path] | None = None) -> dict[str, Any]:
    stem = _slug(f"{lm.name}.{method}")
    pred_file = None
    if predictions:
        pred_file = out / f"{stem}.predictions.jsonl"
        with open(pred_file, "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False, default=str) + "\n")
    return {
        "checkpoint": str(lm.path),
        "model": lm.name,
        "task": task.name,
        "kind": task.kind,
        "method": method,
        "shots": k,
        "metrics": metrics,
        "seconds": round(seconds, 2),
        "predictions": str(pred_file) if pred_file else None,
        "figures": [str(f) for f in figures or [] if f],
    }


# ----------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def results_table(rows: list[dict[str, Any]], kind: str) -> str:
    keys = [k for k in HEADLINE[kind] if any(k in r["metrics"] for r in rows)]
    lines = ["| model | method | " + " | ".join(keys) + " | n | seconds |", "|---|---|" + "---:|" * (len(keys) + 2)]
    for r in rows:
        m = r["metrics"]
        n = m.get("n", m.get("replies", m.get("tokens", "")))
        cells = [_fmt(m.get(k, "")) for k in keys]
        lines.append(f"| {r['model']} | {r['method']} | " + " | ".join(cells) + f" | {_fmt(n)} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], kind: str, path: Path, title: str) -> Path | None:
    """Grouped bars of the headline metrics, one group per metric, one bar per row."""
    keys = [k for k in HEADLINE[kind] if all(isinstance(r["metrics"].get(k), (int, float)) for r in rows)]
    if kind in ("chat", "perplexity"):
        keys = [k for k in keys if k not in ("perplexity", "reply_tokens_mean")]  # other scales
    if len(rows) < 2 or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) * max(1, len(rows) / 2)), 4.0))
    for i, r in enumerate(rows):
        vals = [float(r["metrics"][k]) for k in keys]
        bars = ax.bar(np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width, vals, width, label=f"{r['model']} {r['method']}")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(np.arange(len(keys)), keys)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry point
def run_eval(checkpoints: list[str], task_names: list[str], opts: EvalOptions, out_dir: str | Path,
             text_files: list[str] = ()) -> dict[str, Any]:
    """Evaluate every checkpoint on every task; write the run directory; return the results."""
    from ..data.tasks import TaskSpec, load_task
    from ..runs.tracking import LogConfig, RunLogger
    from ..runs.report import write_report

    opts.validate()
    if not checkpoints:
        raise ConfigError("name at least one checkpoint to evaluate")
    tasks = [load_task(t) for t in task_names]
    for f in text_files:
        if not Path(f).is_file():
            raise ConfigError(f"text file not found: {f}")
        tasks.append(TaskSpec(name=_slug(Path(f).stem), kind="perplexity", train_path=None, test_path=str(Path(f).resolve())))
    if not tasks:
        raise ConfigError("name at least one task (--task NAME|PATH, see --list-tasks) or --text FILE")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"a task is named twice: {names}")
    from ..hardware import use_threads

    use_threads(opts.threads)  # default: the usable cores (affinity and cgroup quota)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(opts).items() if k != "progress"}
    config = {"checkpoints": list(checkpoints), "tasks": names, **settings}
    logger = RunLogger(out, LogConfig(console=False, wandb=opts.wandb), enabled=True, total_steps=0, start_step=0,
                       config=config)
    rows: list[dict[str, Any]] = []
    try:
        for ckpt in checkpoints:
            lm = load_for_eval(ckpt, opts)
            for task in tasks:
                task_out = out / _slug(task.name)
                task_out.mkdir(parents=True, exist_ok=True)
                print(f"[{lm.name}] {task.name} ({task.kind})", flush=True)
                for row in RUNNERS[task.kind](lm, task, opts, task_out):
                    rows.append(row)
                    numeric = {k: v for k, v in row["metrics"].items() if isinstance(v, (int, float)) and math.isfinite(v)}
                    logger.log(row["shots"] or 0, f"eval/{task.name}/{lm.name}/{_slug(row['method'])}", numeric)
                    head = ", ".join(f"{k} {_fmt(row['metrics'][k])}" for k in HEADLINE[task.kind] if k in row["metrics"])
                    print(f"  {row['method']:>12}: {head}  ({row['seconds']:.1f} s)", flush=True)
            del lm
    finally:
        logger.close()
    figures, tables = [], []
    for task in tasks:
        trows = [r for r in rows if r["task"] == task.name]
        tables.append((f"{task.name} ({task.kind})", results_table(trows, task.kind)))
        png = plot_comparison(trows, task.kind, out / _slug(task.name) / "compare.png", f"{task.name}: side by side")
        if png:
            figures.append((f"{task.name}: side by side", png))
        for r in trows:
            figures += [(f"{task.name}: {r['model']}, {r['method']}", Path(f)) for f in r["figures"]]
    result = {"config": config, "rows": rows}
    atomic_write_json(out / "results.json", result)
    report = write_report(out, title=f"Evaluation: {', '.join(names)}", config=config,
                          summary={f"{r['task']}/{r['model']}/{r['method']}": {k: r["metrics"][k] for k in HEADLINE[r['kind']] if k in r["metrics"]} for r in rows},
                          figures=figures, tables=tables)
    print("\n".join(f"\n{t}\n{md}" for t, md in tables))
    print(f"\nresults: {out / 'results.json'}\nreport: {report}")
    return result
