"""What the ``lmforge data`` actions need beyond their library's ``run_*(cfg)``.

Every data action is a typed config (``RedditConfig``, ``CleanConfig``, ...) filled from a recipe
under ``recipes/data-<action>/`` and ``key=value`` overrides, and the library function that runs it
(``run_reddit``, ``run_clean``, ...); :mod:`lmforge.cli` registers them in its command table.
``augment`` alone has a flag beside the overrides (``--paraphrase-model``), declared here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import option

if TYPE_CHECKING:
    from .augment import AugmentConfig


@dataclass(kw_only=True)
class AugmentFlags:
    paraphrase_model: str | None = option(None, "lmforge checkpoint that paraphrases", metavar="CKPT")


def run_augment_command(cfg: AugmentConfig, flags: AugmentFlags) -> Any:
    """``--paraphrase-model CKPT`` is the ``paraphrase_model=CKPT`` setting (and wins over it)."""
    from .augment import run_augment

    if flags.paraphrase_model:
        cfg = dataclasses.replace(cfg, paraphrase_model=flags.paraphrase_model)
    return run_augment(cfg)
