"""``lmforge quickstart``'s settings: its flags, validated in ``__post_init__`` (torch-free, so the
command line builds its parser from this dataclass without importing the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import ConfigError

PRETRAIN_RECIPE = "quickstart"
DEFAULT_BASE = "smollm2"
DATA_STAGES = ("dump", "reddit", "clean", "pii", "dedup")


def data_overrides(items: list[str]) -> dict[str, list[str]]:
    """``--data STAGE.KEY=VALUE`` items -> {stage: ["KEY=VALUE", ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        stage, _, rest = item.partition(".")
        if stage not in DATA_STAGES or "=" not in rest:
            raise ConfigError(f"--data {item!r}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(DATA_STAGES)}")
        out.setdefault(stage, []).append(rest)
    return out


@dataclass(kw_only=True)
class QuickstartConfig:
    out: str = option("runs/quickstart", "run directory (default runs/quickstart)")
    base: str = option(DEFAULT_BASE, "scratch | smollm2 | PATH (checkpoint, HF directory, .gguf) | hf:ORG/NAME "
                       "(default smollm2)")
    minutes: float = option(10.0, "the budget, dump to serving (default 10)")
    heldout: int = option(20, "held-out conversations evaluated (default 20)")
    reply_tokens: int = option(128, "the evaluation's greedy reply budget in tokens (default 128)")
    cpt_share: float = option(0.0, "share of the training time spent on continued pretraining (loss on every token "
                              "of the conversations) before chat SFT; default 0 (measured: SFT alone gives a lower "
                              "held-out loss)")
    sft: list[str] = option([], "an override of the chat SFT recipe", metavar="KEY=VALUE")
    data: list[str] = option([], "an override of a data stage's quickstart recipe, e.g. dump.max_conversations=200, "
                             "reddit.val_fraction=0.1 (stages: dump, reddit, clean, pii, dedup)",
                             metavar="STAGE.KEY=VALUE")
    vocab_size: int = option(2048, "scratch: BPE vocabulary (default 2048)")
    no_serve: bool = option(False, "stop after the report instead of serving the chatbot")
    host: str = option("127.0.0.1", "serve on this address (default 127.0.0.1)")
    port: int = option(8000, "serve on this port (default 8000)")
    overrides: list[str] = option([], "scratch: refine the pretrain recipe", positional=True, nargs="*",
                                  metavar="key=value")

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {self.minutes}")
        if self.heldout < 1:
            raise ConfigError(f"--heldout must be at least 1, got {self.heldout}")
        if self.reply_tokens < 1:
            raise ConfigError(f"--reply-tokens must be at least 1, got {self.reply_tokens}")
        if not 0.0 <= self.cpt_share < 1.0:
            raise ConfigError(f"--cpt-share must be in [0, 1), got {self.cpt_share}")
        if self.base != "scratch" and self.overrides:
            raise ConfigError("key=value overrides refine the scratch pretraining recipe; with a pretrained --base "
                              "refine the chat SFT with --sft KEY=VALUE")
        if self.base == "scratch" and self.cpt_share:
            raise ConfigError("--cpt-share continues a pretrained base; --base scratch pretrains on the conversations "
                              "already")
        data_overrides(self.data)
