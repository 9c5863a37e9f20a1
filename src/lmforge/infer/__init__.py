"""Inference: the one engine (KV cache, sampling, streaming, batching) and its front ends.

Names are imported on first use, so importing the package costs nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Completion": "engine",
    "InferenceEngine": "engine",
    "StreamDelta": "engine",
    "load_engine": "engine",
    "SamplingParams": "sampling",
    "TokenLogprob": "sampling",
}
__all__ = [*sorted(_EXPORTS), "greedy"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def greedy(model, prompt: list[int], max_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of token ids (no tokenizer needed): the engine's KV-cache path."""
    from .engine import InferenceEngine
    from .sampling import SamplingParams

    engine = InferenceEngine(model, None, max_batch_size=1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_ids))
    return engine.generate([prompt], params)[0].token_ids
