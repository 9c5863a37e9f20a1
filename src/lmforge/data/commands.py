"""The ``lmforge data`` actions of the data pipeline: parsers and handlers, kept out of cli.py.

Each action is a config dataclass, a ``run_*`` function and a recipe folder
``recipes/data-<action>/``; ``lmforge data ACTION --help`` lists every setting.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: action -> (module, config class, run function, help)
ACTIONS: dict[str, tuple[str, str, str, str]] = {
    "reddit": ("reddit", "RedditConfig", "run_reddit",
               "Pushshift Reddit dumps (RC_/RS_ .zst, NDJSON) -> train/val chat conversations"),
    "clean": ("clean", "CleanConfig", "run_clean",
              "normalize and filter a corpus or conversations (unicode, controls, length, quality, language)"),
    "dedup": ("dedup", "DedupConfig", "run_dedup", "drop exact (hash) and near (MinHash LSH) duplicates"),
    "pii": ("pii", "PiiConfig", "run_pii", "mask emails, phones, URLs, IPs, cards, /u/ names with typed placeholders"),
    "augment": ("augment", "AugmentConfig", "run_augment",
                "token noise, paraphrases by a model, context truncation, system prompts (seeded)"),
    "reddit-dump": ("reddit_dump", "RedditDumpConfig", "build_reddit_dump",
                    "human conversations (default: the embedded ones) -> a Pushshift-format month with deleted, "
                    "bot, spam, duplicate and PII records planted"),
    "synth-reddit": ("reddit_synth", "SynthRedditConfig", "synth_reddit",
                     "write a synthetic Pushshift-format dump (RC_/RS_ .zst) for tests and trials"),
}


def _load(action: str) -> tuple[type, Callable[..., Any]]:
    module, cls, fn, _ = ACTIONS[action]
    mod = importlib.import_module(f"lmforge.data.{module}")
    return getattr(mod, cls), getattr(mod, fn)


def add_parsers(data_sub: Any, stage_parser: Callable[..., Any]) -> None:
    """Add the pipeline actions to the ``lmforge data`` subparsers (``stage_parser`` is cli's)."""
    for action, (_, _, _, help_) in ACTIONS.items():
        cls, _ = _load(action)
        extra = None
        if action == "augment":
            def extra(p: Any) -> None:
                p.add_argument("--paraphrase-model", metavar="CKPT", help="lmforge checkpoint that paraphrases")
        stage_parser(data_sub, action, f"data-{action}", cls, help_, extra)


def run_action(action: str, args: Any) -> Any:
    """Handler of ``lmforge data ACTION``: recipe <- overrides -> config -> run."""
    from ..config import load_config

    cls, run = _load(action)
    overrides = list(args.overrides)
    if getattr(args, "paraphrase_model", None):
        overrides.append(f"paraphrase_model={args.paraphrase_model}")
    return run(load_config(cls, f"data-{action}", args.recipe, overrides))
