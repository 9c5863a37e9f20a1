"""The options every inference command shares: which checkpoint and how it is loaded
(:class:`EngineOptions`), how tokens are drawn (:class:`SamplingOptions`).

Plain dataclasses of :func:`lmforge.config.option` fields, free of torch: the command line builds
its parsers from them (``generate``, ``chat``, ``sample``, ``attention``), and a command's config
dataclass inherits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import CHECKPOINT_HELP, option


@dataclass(kw_only=True)
class EngineOptions:
    """The checkpoint and how it is loaded (every inference command)."""

    checkpoint: str = option(help=CHECKPOINT_HELP, positional=True)
    device: str = option("cpu", group="engine")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", group="engine", help="compute dtype (auto: float32 on a CPU, bfloat16 for int8/int4 models where bf16 "
        "is fast; bfloat16 on GPUs with it, else float16; `lmforge env` shows the choice)")
    threads: int = option(0, group="engine", help="CPU threads (default 0: the usable cores, cgroup quota included)")
    quantize: Literal["none", "bf16", "int8", "int4"] = option(
        "none", group="engine", help="quantize the weights at load (a quantized checkpoint loads as saved)")


@dataclass(kw_only=True)
class SamplingOptions:
    """How tokens are drawn (the commands give their own ``max_tokens`` / ``temperature`` defaults)."""

    max_tokens: int = option(256, "new tokens at most (default %(default)s)", aliases=("--max-new-tokens",),
                             group="sampling")
    temperature: float = option(1.0, "0 is greedy", group="sampling")
    greedy: bool = option(False, "same as --temperature 0", group="sampling")
    top_k: int = option(0, "0 is off", group="sampling")
    top_p: float = option(1.0, group="sampling")
    min_p: float = option(0.0, group="sampling")
    repetition_penalty: float = option(1.0, group="sampling")
    presence_penalty: float = option(0.0, group="sampling")
    frequency_penalty: float = option(0.0, group="sampling")
    stop: list[str] = option([], "stop string (repeatable)", metavar="TEXT", group="sampling")
    stop_token: list[str] = option([], "stop at this token, given by its text (e.g. '<|im_end|>') or id (repeatable)",
                                   metavar="TOKEN", group="sampling")
    ignore_eos: bool = option(False, "do not stop at the end-of-text token", group="sampling")
    seed: int | None = option(None, group="sampling")
