"""`lmforge finetune`: adapt a trained or imported model (chat SFT, classification, DPO),
fully or with a parameter-efficient method, on the one training engine.

A run directory gets the engine's usual files (checkpoints, metrics.jsonl, TensorBoard,
summary.json, the report card report.md with plots/) and, for classification,
``classification.json``, ``classification.md`` and ``confusion_matrix.png`` (also in the
report). With a PEFT method the checkpoints are adapter checkpoints (only the trained
tensors; they name their base), which every command that takes a checkpoint loads like any
other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import load_model, read_config, resolve_checkpoint
from ..config import to_dict
from ..errors import ConfigError
from ..model.peft import PeftConfig, apply_peft, store_frozen_in, trainable_summary
from ..runs.tracking import LogConfig
from .continual import ContinualConfig, describe, make_penalties, replay_sft_objective, whole_parameter_readers
from .engine import Engine, TrainConfig, autocast_dtype, check_parallel, resolve_train_precision
from .hooks import peft_hooks
from .objectives.classify import ClassifyConfig, ClassifyObjective
from .objectives.dpo import DPOConfig, DPOObjective, reference_for
from .objectives.sft import SFTConfig, SFTObjective
from .saving import SaveSpec
from .state import check_fresh_run


@dataclass
class FinetuneDataConfig:
    train: list[str] = field(default_factory=list)  # files, directories, globs or hf:NAME[:CONFIG][@SPLIT]
    val: list[str] = field(default_factory=list)  # held-out examples (default: val_fraction of train)
    task: str = ""  # classification: an embedded task name or task YAML (its train and test splits)
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    val_fraction: float = 0.05
    labels: list[str] = field(default_factory=list)  # classification label set (default: the labels seen)
    text_field: str = "text"
    label_field: str = "label"
    max_records: int | None = None  # read at most this many training records
    max_val_records: int | None = None
    write_rejects: bool = False  # rejected records to <out_dir>/rejects.{train,val}.jsonl

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


def _default_train() -> TrainConfig:
    return TrainConfig(
        max_steps=200, micro_batch_size=4, lr=2e-4, warmup_steps=10, weight_decay=0.0, eval_interval=50,
        min_lr_ratio=0.0, log_interval=5,
    )


@dataclass
class FinetuneConfig:
    base: str = ""  # the checkpoint (or run directory) to adapt
    objective: Literal["sft", "classify", "dpo"] = "sft"
    out_dir: str = "runs/finetune"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    train: TrainConfig = field(default_factory=_default_train)
    log: LogConfig = field(default_factory=LogConfig)
    overwrite: bool = False
    continual: ContinualConfig = field(default_factory=ContinualConfig)  # SFT: replay old conversations, L2 / EWC


KIND = {"sft": "chat", "classify": "classify", "dpo": "preference"}


def _load_data(cfg: FinetuneConfig, out: Path):
    """(train examples, val examples, labels, report of the loaders)."""
    from ..data.examples import load_examples, split_examples

    d = cfg.data
    kind = KIND[cfg.objective]
    labels = list(d.labels) or None
    rejects = (lambda split: out / f"rejects.{split}.jsonl") if d.write_rejects else (lambda split: None)
    common = dict(text_field=d.text_field, label_field=d.label_field)
    if d.task:
        if cfg.objective != "classify":
            raise ConfigError("data.task names a classification task; it needs objective=classify")
        from ..data.tasks import load_task

        task = load_task(d.task)
        train = task.train(max_records=d.max_records, rejects_path=rejects("train"))
        val = task.test(max_records=d.max_val_records, rejects_path=rejects("val"))
        labels = list(task.labels)
    else:
        if not d.train:
            raise ConfigError("no training data: set data.train=[file.jsonl] (or data.task for classification)")
        train = load_examples(d.train, kind, format=d.format, labels=labels, max_records=d.max_records,
                              rejects_path=rejects("train"), **common)
        val = None
        if d.val:
            val = load_examples(d.val, kind, format=d.format, labels=labels or train.labels,
                                max_records=d.max_val_records, rejects_path=rejects("val"), **common)
    for name, es in (("train", train), ("val", val)):
        if es is not None and es.stats.n_rejected:
            print(f"{name}: kept {len(es.examples)} of {es.stats.seen} records; rejected {es.stats.describe_rejects()}")
            for line in es.problems[:5]:
                print(f"  {line}")
    if val is None:
        train_ex, val_ex = split_examples(train, d.val_fraction, cfg.train.seed)
    else:
        train_ex, val_ex = train.examples, val.examples
    if cfg.objective == "classify":
        labels = labels or train.labels
        if not labels or len(labels) < 2:
            raise ConfigError("classification needs at least two labels")
    report = {
        "train": {"seen": train.stats.seen, "kept": len(train.examples), "rejected": dict(train.stats.rejected)},
        "val": None if val is None else {"seen": val.stats.seen, "kept": len(val.examples), "rejected": dict(val.stats.rejected)},
    }
    return train_ex, val_ex, labels, report


def preview_finetune(cfg: FinetuneConfig, n: int, color: bool = False) -> str:
    """``--preview N``: the first N chat SFT training examples, rendered and tokenized as training
    will see them, loss-carrying tokens marked (:mod:`.objectives.preview`). Loads no model."""
    import tempfile

    from ..tokenizer import Tokenizer
    from ..tokenizer.chat import ChatTemplate
    from .objectives.preview import preview

    if n < 1:
        raise ConfigError(f"--preview must be at least 1, got {n}")
    if cfg.objective != "sft":
        raise ConfigError(f"--preview shows chat SFT examples; this recipe's objective is {cfg.objective}")
    if not cfg.base:
        raise ConfigError("no base model: set base=CHECKPOINT (its tokenizer and chat template render the examples)")
    base = resolve_checkpoint(cfg.base)
    context = int(read_config(base)["model"]["context_length"])
    with tempfile.TemporaryDirectory() as tmp:  # rejects files, if asked for, are not this command's output
        train_ex, _, _, _ = _load_data(replace(cfg, data=replace(cfg.data, max_val_records=1)), Path(tmp))
    return preview(train_ex, Tokenizer.from_file(base / "tokenizer.json"), ChatTemplate.from_checkpoint(base),
                   assistant_only=cfg.sft.assistant_only, max_length=min(cfg.sft.max_length, context), n=n,
                   color=color, total=len(train_ex))


def run_finetune(cfg: FinetuneConfig, resume: bool = False) -> dict[str, Any]:
    from ..tokenizer import Tokenizer
    from ..tokenizer.chat import ChatTemplate

    if not cfg.base:
        raise ConfigError("no base model: set base=CHECKPOINT (a checkpoint or run directory)")
    if cfg.continual.replay_data and cfg.objective != "sft":
        raise ConfigError("continual.replay_data (replay of old conversations) works with objective=sft")
    out = Path(cfg.out_dir)
    adalora = ["peft.method=adalora"] if cfg.peft.method == "adalora" else []
    check_parallel(cfg.train, adalora + whole_parameter_readers(cfg.continual))
    check_fresh_run(out, resume, cfg.overwrite)
    base = resolve_checkpoint(cfg.base)
    base_config = read_config(base)
    tokenizer = Tokenizer.from_file(base / "tokenizer.json")
    template = ChatTemplate.from_checkpoint(base)
    out.mkdir(parents=True, exist_ok=True)
    train_ex, val_ex, labels, data_report = _load_data(cfg, out)

    torch.manual_seed(cfg.train.seed)
    model, _ = load_model(base)
    peft = cfg.peft
    if cfg.objective == "classify":
        if model.config.num_labels and model.config.num_labels != len(labels):
            raise ConfigError(f"the base already has a {model.config.num_labels}-class head; the data has {len(labels)} labels")
        if not model.config.num_labels:
            model.add_classification_head(len(labels))
        if peft.method != "none" and "score" not in peft.modules_to_save:
            peft = replace(peft, modules_to_save=[*peft.modules_to_save, "score"])
    apply_peft(model, peft, tokenizer=tokenizer, total_steps=cfg.train.max_steps, seed=cfg.train.seed)
    params = trainable_summary(model)
    compute = autocast_dtype(resolve_train_precision(cfg.train))
    if peft.method != "none" and compute is not None:  # the frozen base in the autocast dtype (bf16 only where fast)
        store_frozen_in(model, compute)
    context = model.config.context_length - model.virtual_tokens

    if cfg.objective == "sft":
        objective = SFTObjective(train_ex, val_ex, tokenizer, template, cfg.sft, context)
        objective = replay_sft_objective(cfg.continual, objective, tokenizer, template, cfg.sft, context, cfg.train.seed)
    elif cfg.objective == "classify":
        objective = ClassifyObjective(train_ex, val_ex, labels, tokenizer, cfg.classify, context)
    else:
        dpo_cfg = replace(cfg.dpo, max_length=min(cfg.dpo.max_length, context))
        objective = DPOObjective(train_ex, val_ex, tokenizer, template, dpo_cfg, reference_for(model, peft.method == "none"))

    run_config = to_dict(replace(cfg, peft=peft))
    extra: dict[str, Any] = {"finetune": {"objective": cfg.objective, "peft": peft.method, "base": str(base.resolve())}}
    if "tokenizer" in base_config:
        extra["tokenizer"] = base_config["tokenizer"]
    if labels and cfg.objective == "classify":
        extra["labels"] = labels
        extra["classify_template"] = cfg.classify.template  # how `lmforge eval` puts texts to the head
    engine = Engine(
        model,
        objective,
        cfg.train,
        out,
        log=cfg.log,
        saving=SaveSpec(tokenizer_file=base / "tokenizer.json", extra=extra, sidecars_from=base,
                        base_checkpoint=base if peft.method != "none" else None),
        run_config=run_config,
        hooks=peft_hooks(model),
    )
    if cfg.continual.enabled:  # theta0 / Fisher: the weights the run starts from, before a resume
        engine.hooks.extend(make_penalties(cfg.continual, engine.model, engine.objective, engine.autocast,
                                           verbose=engine.dist.is_main))
        if engine.dist.is_main:
            print(describe(cfg.continual, engine.objective))
    engine.start(resume, cfg.overwrite)
    if engine.dist.is_main:
        print(
            f"finetune ({cfg.objective}, {peft.method if peft.method != 'none' else 'full'}): "
            f"{params['trainable_params']:,} trainable of {params['total_params']:,} parameters "
            f"({params['trainable_percent']:.3f}%); {len(train_ex)} train / {len(val_ex)} val examples"
        )
    start_eval = engine.evaluate_before_training() if val_ex and engine.step == 0 else {}
    t0 = time.perf_counter()
    result = engine.fit(report=False)  # the report card is written below, with this run's summary
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "objective": cfg.objective,
        "method": peft.method if peft.method != "none" else "full",
        "quantize_base": peft.quantize_base,
        **params,
        "steps": result.steps,
        "wall_s": wall,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_mib": result.peak_rss_mib,
        "before": start_eval,
        "after": result.final,
        "data": data_report,
        "checkpoint": result.checkpoint,
    }
    if torch.cuda.is_available() and engine.device.type == "cuda":
        summary["peak_cuda_mib"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    sft_objective = getattr(objective, "new", objective)  # with continual replay: the new data's objective
    if isinstance(sft_objective, SFTObjective):
        summary["sft"] = sft_objective.stats
    predictions = None
    if isinstance(objective, ClassifyObjective) and objective.val:
        engine.model.eval()
        with engine.gathered():  # under FSDP every rank gathers the model while rank 0 predicts
            predictions = objective.predict(engine.model) if engine.dist.is_main else None
    if engine.dist.is_main:
        figures, tables = [], []
        if isinstance(objective, ClassifyObjective) and objective.val:
            summary["classification"], markdown = _classification_report(objective, predictions, out)
            figures.append(("Held-out confusion matrix", out / "confusion_matrix.png"))
            tables.append(("Held-out classification report", markdown))
        method = summary["method"] + (f", {peft.quantize_base} base" if peft.quantize_base != "none" else "")
        report = engine.write_report(
            title=f"Fine-tuning run {out.name}: {cfg.objective} ({method})",
            summary={k: v for k, v in summary.items() if k not in ("quantize_base", "method", "objective")},
            figures=figures,
            tables=tables,
            notes=f"Base model: `{base.resolve()}`. {len(train_ex)} train / {len(val_ex)} held-out examples.",
        )
        summary["report"] = str(report) if report else None
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
    return summary


def _classification_report(objective: ClassifyObjective, predictions: tuple[list[int], list[int]], out: Path) -> tuple[dict[str, Any], str]:
    """(headline metrics, the report as markdown) of ``predictions`` (true, predicted) on the
    held-out set; writes classification.json/.md and the confusion-matrix PNG into ``out``."""
    from ..runs.metrics import (
        classification_report,
        format_report_markdown,
        plot_confusion_matrix,
    )

    true, pred = predictions
    report = classification_report(true, pred, objective.labels)
    (out / "classification.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion_matrix(report, out / "confusion_matrix.png", title="held-out confusion matrix")
    markdown = format_report_markdown(report)
    (out / "classification.md").write_text(markdown + "\n\n![confusion matrix](confusion_matrix.png)\n")
    headline = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "micro_f1": report["micro_f1"]}
    return headline, markdown


def _print_summary(s: dict[str, Any]) -> None:
    before, after = s.get("before") or {}, s.get("after") or {}
    rows = [
        ("trainable", f"{s['trainable_params']:,} ({s['trainable_percent']:.3f}%)"),
        ("steps / wall", f"{s['steps']} / {s['wall_s']:.0f} s"),
        ("tokens/s", f"{s['tokens_per_s']:,.0f}"),
        ("peak RSS", f"{s['peak_rss_mib']:,.0f} MiB"),
    ]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        rows.append((key, f"{b:.4f} -> {a:.4f}" if b is not None and a is not None else f"{a if a is not None else b:.4f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
