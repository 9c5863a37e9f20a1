"""What the ``lmforge data`` actions need beyond their library's ``run_*(cfg)``.

Every data action is a typed config (``RedditConfig``, ``CleanConfig``, ...) filled from a recipe
under ``recipes/data-<action>/`` and ``key=value`` overrides, and the library function that runs it
(``run_reddit``, ``run_clean``, ...); :mod:`lmforge.cli` registers them in its command table.
``augment`` alone has a flag beside the overrides (``--paraphrase-model``), declared here, and
paraphrases through a model: the engine is wired to the library's ``complete`` callable here, so that
the data layer does not import the inference engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import option

if TYPE_CHECKING:
    from ..data.augment import AugmentConfig, Complete


@dataclass(kw_only=True)
class AugmentFlags:
    paraphrase_model: str | None = option(None, "lmforge checkpoint that paraphrases", metavar="CKPT")


def engine_paraphraser(checkpoint: str, max_new_tokens: int = 128, temperature: float = 0.7, seed: int = 0) -> Complete:
    """A ``complete(prompts) -> completions`` callable over the lmforge model at
    ``checkpoint``, through the inference engine (batched, seeded)."""
    from ..infer.engine import load_engine
    from ..infer.sampling import SamplingParams

    engine = load_engine(checkpoint, overflow="truncate")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=seed,
                            stop=["\n\n"])

    def complete(prompts: list[str]) -> list[str]:
        return [c.text for c in engine.generate(prompts, params)]

    return complete


def run_augment_command(cfg: AugmentConfig, flags: AugmentFlags) -> Any:
    """``--paraphrase-model CKPT`` is the ``paraphrase_model=CKPT`` setting (and wins over it); the
    paraphrases come from that checkpoint through the inference engine."""
    from ..data.augment import run_augment

    if flags.paraphrase_model:
        cfg = dataclasses.replace(cfg, paraphrase_model=flags.paraphrase_model)
    cfg.validate()  # before the model is loaded
    complete = engine_paraphraser(cfg.paraphrase_model) if cfg.paraphrase_model else None
    return run_augment(cfg, complete=complete)
