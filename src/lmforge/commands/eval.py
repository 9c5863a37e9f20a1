"""`lmforge eval` and `lmforge attention`: each a config dataclass (the command's flags, validated
in ``__post_init__``) and a ``run_*(cfg)`` function over the evaluation library.

Torch-free at module level: the command line builds its parsers from these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import option
from ..errors import ConfigError
from .options import EngineOptions


def parse_shots(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--shots takes numbers separated by commas, e.g. 0,5; got {text!r}") from None


@dataclass(kw_only=True)
class EvalConfig:
    """``lmforge eval CKPT... --task NAME``: checkpoints x tasks -> results, predictions, plots, report."""

    checkpoints: list[str] = option([], "checkpoint or run directories (several: side by side)", positional=True,
                                    nargs="*", metavar="CKPT")
    task: list[str] = option([], "embedded task name or task YAML (repeatable, or comma-separated)")
    text: list[str] = option([], "also: perplexity on a text file (repeatable)", metavar="FILE")
    shots: str = option("0", "in-context examples for classify / multiple-choice tasks, e.g. 0,5 (default 0)")
    seed: int = option(0, "seed of the few-shot draw and sampling (default 0)")
    limit: int | None = option(None, "a seeded sample of N test examples a task (perplexity tasks: the whole text)")
    batch_size: int = option(8)
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "auto (default): bf16 autocast where bf16 is fast (AVX512-BF16/AMX CPUs, GPUs), else fp32")
    max_length: int | None = option(None, "perplexity window in tokens (default: the task's, else the context)")
    stride: int | None = option(None, "perplexity: tokens scored per window (default half the window)")
    chat: Literal["auto", "on", "off"] = option(
        "off", "prompts in the chat template: off (default, as lm-eval), on, or auto = when the checkpoint has one; "
        "chat tasks always use it")
    max_tokens: int | None = option(None, "generation / chat reply budget (default: the task's)")
    threads: int | None = option(None, "CPU threads (default: the usable cores, cgroup quota included)")
    out: str | None = option(None, "run directory (default runs/eval/<first checkpoint's name>)")
    wandb: bool = option(False, "also log to Weights & Biases")
    list_tasks: bool = option(False, "list the embedded tasks and exit")

    def __post_init__(self) -> None:
        if self.list_tasks:
            return
        parse_shots(self.shots)
        if not self.checkpoints:
            raise ConfigError("name a checkpoint to evaluate: lmforge eval CKPT --task NAME")


def run_eval_command(cfg: EvalConfig) -> None:
    from ..data.tasks import list_tasks, load_task
    from ..eval.run import EvalOptions, _slug, run_eval

    if cfg.list_tasks:
        for name in list_tasks():
            t = load_task(name)
            print(f"{name:<24} {t.kind:<16} {t.description.strip()[:90]}")
        return
    tasks = [t.strip() for spec in cfg.task for t in spec.split(",") if t.strip()]
    opts = EvalOptions(
        shots=parse_shots(cfg.shots), seed=cfg.seed, limit=cfg.limit, batch_size=cfg.batch_size,
        precision=cfg.precision, max_length=cfg.max_length, stride=cfg.stride, chat=cfg.chat,
        max_tokens=cfg.max_tokens, threads=cfg.threads, wandb=cfg.wandb,
    )
    out = cfg.out or str(Path("runs") / "eval" / _slug(Path(cfg.checkpoints[0]).resolve().name))
    run_eval(cfg.checkpoints, tasks, opts, out, text_files=cfg.text)


@dataclass(kw_only=True)
class AttentionConfig(EngineOptions):
    """``lmforge attention CKPT TEXT``: attention maps of a text, per layer and head."""

    text: str = option(help="the text to run the model on", positional=True)
    out: str | None = option(None, "output directory (default runs/attention/<slug of the text>)")
    layers: str | None = option(None, "layer indices, e.g. 0,3 or 2-5 (default all)")
    heads: str | None = option(None, "head indices, e.g. 0,1 (default all)")
    max_tokens: int | None = option(None, "keep the first N tokens (default: refuse a text longer than the context)")
    top_k: int = option(5, "most attended tokens listed per head and overall (default 5)")
    chat: bool = option(False, "wrap the text as a user message in the chat template")


def run_attention_command(cfg: AttentionConfig) -> None:
    from ..hardware import use_threads
    from ..eval.attention import run_attention

    use_threads(cfg.threads)
    run_attention(
        cfg.checkpoint, cfg.text, out=cfg.out, layers=cfg.layers, heads=cfg.heads, max_tokens=cfg.max_tokens,
        top_k=cfg.top_k, chat=cfg.chat, device=cfg.device, dtype=cfg.dtype,
        quantize=None if cfg.quantize == "none" else cfg.quantize,
    )
