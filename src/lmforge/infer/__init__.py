"""Inference: the one engine (KV cache, sampling, streaming, batching) and its front ends."""

from .engine import Completion, InferenceEngine, StreamDelta, load_engine
from .sampling import SamplingParams, TokenLogprob

__all__ = ["Completion", "InferenceEngine", "SamplingParams", "StreamDelta", "TokenLogprob", "greedy", "load_engine"]


def greedy(model, prompt: list[int], max_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of token ids (no tokenizer needed): the engine's KV-cache path."""
    engine = InferenceEngine(model, None, max_batch_size=1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_ids))
    return engine.generate([prompt], params)[0].token_ids
