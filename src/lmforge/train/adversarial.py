"""`lmforge adversarial`: SeqGAN-style training of a chat generator against a discriminator.

One :class:`~lmforge.train.engine.Engine` trains the generator (full or with a PEFT method;
its checkpoints are ordinary generator checkpoints that chat, generate and serve load).
The discriminator is an engine hook (:class:`~.objectives.adversarial.DiscriminatorTrainer`)
with its own optimizer, stepped ``disc_steps`` times after each generator step under the
engine's precision, clipping and schedule, saved beside each generator checkpoint and
restored on ``--resume``. See :mod:`lmforge.train.objectives.adversarial` for the losses.

A run directory gets the engine's files (checkpoints, metrics.jsonl, TensorBoard,
summary.json) and ``adversarial_curves.png`` (discriminator accuracy, reward, KL, held-out
NLL, distinct-1/2 against step), ``samples.md`` (replies before / after) and
``samples.jsonl`` (every evaluation's replies).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model, read_config, resolve_checkpoint
from ..config import to_dict
from ..data.examples import ExampleFormat
from ..errors import ConfigError
from ..model.peft import PeftConfig, apply_peft, store_frozen_in, trainable_summary
from ..runs.report import read_metrics
from ..runs.tracking import LogConfig
from .engine import Engine, TrainConfig, autocast_dtype, check_parallel, resolve_train_precision
from .hooks import EngineHook, peft_hooks
from .objectives.adversarial import (
    AdversarialConfig,
    AdversarialObjective,
    DiscriminatorTrainer,
    load_samples,
    write_samples,
)
from .objectives.dpo import reference_for
from .saving import SaveSpec
from .state import check_fresh_run


@dataclass
class AdversarialDataConfig:
    train: list[str] = field(default_factory=list)  # conversations ({"messages": [...]}): contexts and human replies
    val: list[str] = field(default_factory=list)  # held-out conversations (evaluation)
    format: ExampleFormat = "auto"
    max_records: int | None = None
    max_val_records: int | None = None


def _default_train() -> TrainConfig:
    return TrainConfig(max_steps=100, micro_batch_size=8, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                       schedule="constant", eval_interval=10, log_interval=1, eval_at_start=True)


@dataclass
class AdversarialRunConfig:
    base: str = ""  # the generator: a chat checkpoint (or run directory)
    discriminator: str = ""  # the discriminator's starting checkpoint (default: base); a fresh 2-class head is added
    out_dir: str = "runs/adversarial"
    data: AdversarialDataConfig = field(default_factory=AdversarialDataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)  # the generator's method (none: full fine-tuning)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    train: TrainConfig = field(default_factory=_default_train)
    log: LogConfig = field(default_factory=LogConfig)
    overwrite: bool = False


def _vocab(tokenizer) -> dict[str, int]:
    return tokenizer.hf.get_vocab(with_added_tokens=True)


def check_same_vocabulary(gen_model, gen_tok, disc_model, disc_tok, gen_path, disc_path) -> None:
    """The discriminator reads the generator's token ids: both need the same tokenizer."""
    g, d = gen_model.config.vocab_size, disc_model.config.vocab_size
    if g != d:
        raise ConfigError(
            f"the discriminator ({disc_path}) has a vocabulary of {d} ids, the generator ({gen_path}) {g}: "
            "the discriminator reads the generator's token ids, so both need the same tokenizer"
        )
    gv, dv = _vocab(gen_tok), _vocab(disc_tok)
    if gv != dv:
        diff = sorted(set(gv.items()) ^ set(dv.items()))[:3]
        raise ConfigError(
            f"the discriminator ({disc_path}) and the generator ({gen_path}) have different tokenizers "
            f"(e.g. {', '.join(f'{t!r}={i}' for t, i in diff)}): the discriminator reads the generator's token ids, "
            "so both need the same tokenizer"
        )


def _load_conversations(cfg: AdversarialRunConfig) -> tuple[list[dict], list[dict]]:
    from ..data.examples import load_examples

    d = cfg.data
    if not d.train:
        raise ConfigError("no training conversations: set data.train=[conversations.jsonl]")
    if not d.val:
        raise ConfigError("no held-out conversations: set data.val=[conversations.jsonl] (evaluation needs them)")
    out = []
    for name, spec, cap in (("train", d.train, d.max_records), ("val", d.val, d.max_val_records)):
        es = load_examples(spec, "chat", format=d.format, max_records=cap)
        if es.stats.n_rejected:
            print(f"{name}: kept {len(es.examples)} of {es.stats.seen} records; rejected {es.stats.describe_rejects()}")
        out.append([e for e in es.examples if "messages" in e])
    return out[0], out[1]


def plot_adversarial(metrics_file: Path, out_png: Path) -> Path | None:
    """Discriminator accuracy, reward, KL, held-out NLL and distinct-n against step."""
    rows = read_metrics(metrics_file)
    ev = [r for r in rows if r.get("kind") == "eval" and "disc_acc" in r]
    tr = [r for r in rows if r.get("kind") == "train"]
    if not ev and not tr:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("discriminator accuracy", [("eval", "disc_acc", "held-out"), ("train", "disc_train_acc", "train batches")]),
        ("reward (log D(human))", [("eval", "reward_mean", "held-out"), ("train", "reward_mean", "train samples")]),
        ("KL(policy || reference), nats/reply", [("eval", "kl", "held-out"), ("train", "kl", "train samples")]),
        ("held-out NLL of human replies", [("eval", "val_nll", "held-out")]),
        ("distinct-n of generated replies", [("eval", "distinct_1", "distinct-1"), ("eval", "distinct_2", "distinct-2")]),
        ("generator loss", [("train", "loss", "total"), ("train", "mle_nll", "MLE NLL (train human)")]),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), sharex=True)
    for ax, (title, series) in zip(axes.flat, panels):
        for kind, key, label in series:
            src = ev if kind == "eval" else tr
            pts = [(r["step"], r[key]) for r in src if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if kind == "eval" else "-",
                        lw=1.5 if kind == "eval" else 0.8, ms=3, label=label, alpha=1.0 if kind == "eval" else 0.6)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("generator step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def run_adversarial(cfg: AdversarialRunConfig, resume: bool = False) -> dict[str, Any]:
    from ..tokenizer import Tokenizer
    from ..tokenizer.chat import ChatTemplate

    if not cfg.base:
        raise ConfigError("no generator: set base=CHECKPOINT (a chat checkpoint or run directory)")
    out = Path(cfg.out_dir)
    check_parallel(cfg.train)
    check_fresh_run(out, resume, cfg.overwrite)
    base = resolve_checkpoint(cfg.base)
    disc_path = resolve_checkpoint(cfg.discriminator or cfg.base)
    tokenizer = Tokenizer.from_file(base / "tokenizer.json")
    disc_tokenizer = Tokenizer.from_file(disc_path / "tokenizer.json")
    template = ChatTemplate.from_checkpoint(base)
    base_config = read_config(base)

    torch.manual_seed(cfg.train.seed)
    generator, _ = load_model(base)
    discriminator, _ = load_model(disc_path)
    check_same_vocabulary(generator, tokenizer, discriminator, disc_tokenizer, base, disc_path)
    if discriminator.config.num_labels not in (0, 2):
        raise ConfigError(f"the discriminator checkpoint already has a {discriminator.config.num_labels}-class head; it needs 2")
    if not discriminator.config.num_labels:
        discriminator.add_classification_head(2)
    need = cfg.adversarial.max_context_tokens + cfg.adversarial.max_reply_tokens
    if discriminator.config.context_length < need:
        raise ConfigError(f"the discriminator's context ({discriminator.config.context_length} tokens) is shorter than "
                          f"adversarial.max_context_tokens + max_reply_tokens = {need}")
    train_conv, val_conv = _load_conversations(cfg)
    out.mkdir(parents=True, exist_ok=True)

    peft = cfg.peft
    apply_peft(generator, peft, tokenizer=tokenizer, total_steps=cfg.train.max_steps, seed=cfg.train.seed)
    params = trainable_summary(generator)
    compute = autocast_dtype(resolve_train_precision(cfg.train))
    if peft.method != "none" and compute is not None:  # the frozen base in the autocast dtype (bf16 only where fast)
        store_frozen_in(generator, compute)

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
    disc = DiscriminatorTrainer(discriminator, cfg.adversarial, pad, disc_path / "tokenizer.json")
    objective = AdversarialObjective(generator, train_conv, val_conv, tokenizer, template, cfg.adversarial,
                                     reference_for(generator, peft.method == "none"), disc)
    extra: dict[str, Any] = {"adversarial": {"base": str(base.resolve()), "discriminator": str(disc_path.resolve()),
                                             "peft": peft.method}}
    if "tokenizer" in base_config:
        extra["tokenizer"] = base_config["tokenizer"]
    hooks: list[EngineHook] = [objective, disc, *peft_hooks(generator)]
    train_cfg = replace(cfg.train, eval_at_start=True)
    engine = Engine(
        generator, objective, train_cfg, out, log=cfg.log,
        saving=SaveSpec(tokenizer_file=base / "tokenizer.json", extra=extra, sidecars_from=base,
                        base_checkpoint=base if peft.method != "none" else None),
        run_config=to_dict(replace(cfg, peft=peft)), hooks=hooks,
    )
    disc.attach(engine, objective)
    engine.start(resume, cfg.overwrite)
    if engine.dist.is_main:
        print(
            f"adversarial ({cfg.adversarial.algorithm}, group {cfg.adversarial.group_size}, "
            f"generator {peft.method if peft.method != 'none' else 'full'}): "
            f"{params['trainable_params']:,} trainable generator parameters; "
            f"{len(objective.train_items)} train / {len(objective.val_items)} held-out replies "
            f"({objective.skipped} longer than {cfg.adversarial.max_reply_tokens} tokens left out)"
        )
    if resume:
        load_samples(out, objective)
    t0 = time.perf_counter()
    pre = disc.pretrain() if engine.step == 0 else {}
    pre_s = time.perf_counter() - t0
    result = engine.fit()
    wall = time.perf_counter() - t0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    summary: dict[str, Any] = {
        "objective": "adversarial",
        "algorithm": cfg.adversarial.algorithm,
        "method": peft.method if peft.method != "none" else "full",
        **params,
        "steps": result.steps,
        "wall_s": wall,
        "disc_pretrain_s": pre_s,
        "disc_pretrain": pre,
        "peak_rss_mib": result.peak_rss_mib,
        "before": {k: v for k, v in evals[0].items() if k not in ("kind", "time")} if evals else {},
        "after": result.final,
        "checkpoint": result.checkpoint,
    }
    if engine.dist.is_main:
        summary["samples"] = str(write_samples(out, objective))
        png = plot_adversarial(out / "metrics.jsonl", out / "adversarial_curves.png") if (out / "metrics.jsonl").is_file() else None
        summary["curves"] = str(png) if png else None
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        before, after = summary["before"], summary["after"]
        for key in ("disc_acc", "reward_mean", "kl", "val_nll", "distinct_1", "distinct_2"):
            if key in before or key in after:
                print(f"  {key:<12} {before.get(key, float('nan')):.4f} -> {after.get(key, float('nan')):.4f}")
    return summary
