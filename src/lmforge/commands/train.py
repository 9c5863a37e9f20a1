"""`lmforge pretrain`, `finetune` and `adversarial`: the flags beside ``--recipe`` and the
``key=value`` overrides, and the ``run_*(cfg, flags)`` functions that train and print the outcome.

The settings themselves are the typed stage configs (``PretrainConfig``, ``FinetuneConfig``,
``AdversarialRunConfig``) filled from a recipe and overrides by :func:`lmforge.config.load_config`;
this module is torch-free at module level so that the command line can build its parsers cheaply.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import option

if TYPE_CHECKING:
    from ..train.adversarial import AdversarialRunConfig
    from ..train.finetune import FinetuneConfig
    from ..train.pretrain import PretrainConfig


@dataclass(kw_only=True)
class ResumeFlags:
    resume: bool = option(False, "continue from out_dir's newest checkpoint")


@dataclass(kw_only=True)
class FinetuneFlags(ResumeFlags):
    preview: int | None = option(None, "print N training examples as the model sees them (chat template, tokens, "
                                 "loss-carrying tokens marked, end-of-turn check) and stop without training",
                                 metavar="N")


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report_fit(result: Any, out_dir: str) -> None:
    if not _main_process():
        return
    final = "  ".join(f"{k} {v:.4f}" for k, v in result.final.items())
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f} s ({result.tokens_per_s:,.0f} tokens/s), "
        f"peak RSS {result.peak_rss_mib:,.0f} MiB\n  {final}\n  checkpoint: {result.checkpoint}"
    )
    report = Path(out_dir) / "report.md"
    if report.is_file():
        print(f"  report: {report}")


def run_pretrain_command(cfg: PretrainConfig, flags: ResumeFlags) -> None:
    from ..train.pretrain import run_pretrain

    _report_fit(run_pretrain(cfg, resume=flags.resume), cfg.out_dir)


def run_finetune_command(cfg: FinetuneConfig, flags: FinetuneFlags) -> None:
    from ..train.finetune import preview_finetune, run_finetune

    if flags.preview is not None:
        print(preview_finetune(cfg, flags.preview, color=sys.stdout.isatty()))
        return
    summary = run_finetune(cfg, resume=flags.resume)
    if _main_process():
        print(f"  checkpoint: {summary['checkpoint']}\n  summary: {Path(cfg.out_dir) / 'summary.json'}")
        if summary.get("report"):
            print(f"  report: {summary['report']}")


def run_adversarial_command(cfg: AdversarialRunConfig, flags: ResumeFlags) -> None:
    from ..train.adversarial import run_adversarial

    summary = run_adversarial(cfg, resume=flags.resume)
    print(f"  checkpoint: {summary['checkpoint']}\n  samples: {summary.get('samples')}\n  curves: {summary.get('curves')}")
