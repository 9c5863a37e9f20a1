"""Perplexity and bits per byte of text.

bits/byte = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes of the predicted tokens):
a tokenizer-independent measure. Special tokens (document separators) count as zero bytes, as in
nanochat.

A text longer than the model's context is scored in overlapping windows
(:func:`sliding_window_nll`): the strided evaluation of the Hugging Face perplexity guide, so the
figure equals transformers' on the same weights, tokens, window length and stride.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..runs.metrics import bits_per_byte, token_byte_lengths


# ----------------------------------------------------------------------------- sliding window
def window_plan(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window over ``n_tokens`` tokens, exactly as the Hugging Face
    perplexity guide's loop: windows of ``max_length`` tokens start every ``stride`` tokens until
    one reaches the end; each scores only the tokens the previous window did not reach (the
    first window scores all of its tokens but the first, which nothing predicts). Every token
    but the first is scored once, with up to ``max_length - stride`` tokens of context before
    the scored ones."""
    if max_length < 2:
        raise ConfigError(f"the window length must be at least 2 tokens, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"the stride must be between 1 and the window length ({max_length}), got {stride}")
    if n_tokens < 2:
        raise DataError(f"perplexity needs at least 2 tokens of text, got {n_tokens}")
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        n_scored = end - prev_end - (1 if begin == 0 else 0)
        plan.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@torch.inference_mode()
def sliding_window_nll(
    model: torch.nn.Module,
    ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """The summed next-token loss (nats) of ``ids`` under ``model``, scored with the windows of
    :func:`window_plan` (``max_length`` defaults to the model's context, ``stride`` to half of
    it), windows of equal length batched ``batch_size`` at a time; only the scored positions go
    through the output head. Returns ``nll`` (the sum), ``tokens`` (scored), ``windows``,
    ``max_length``, ``stride`` and ``token_nll`` (float64 array: the loss of token ``i + 1``)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    context = int(model.config.context_length)
    max_length = context if max_length is None else max_length
    if max_length > context:
        raise ConfigError(f"window length {max_length} exceeds the model's context of {context} tokens")
    stride = max(1, max_length // 2) if stride is None else stride
    tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    plan = window_plan(len(tokens), max_length, stride)
    device = next(model.parameters()).device
    token_nll = np.zeros(len(tokens) - 1, dtype=np.float64)
    was_training = model.training
    model.eval()
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in plan:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [ws[i : i + batch_size] for ws in groups.values() for i in range(0, len(ws), batch_size)]
    bar = tqdm(total=len(plan), desc="perplexity", unit="window", disable=not progress, leave=False)
    from ..hardware import autocast_dtype, resolve_precision

    amp = autocast_dtype(resolve_precision(precision, device, setting="precision"))
    autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    try:
        for batch in batches:
            idx = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device)
            rows, cols = [], []
            for r, (b, e, n) in enumerate(batch):
                length = e - b
                cols += range(length - 1 - n, length - 1)  # position p predicts token p + 1
                rows += [r] * n
            rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
            targets = idx[rows_t, cols_t + 1]
            with autocast:
                h = model.hidden_states(idx)
            nll = torch.empty(len(rows), dtype=torch.float64)
            for s in range(0, len(rows), 1024):  # the output head on at most 1024 positions at once
                sl = slice(s, s + 1024)
                with autocast:
                    logits = model.logits(h[rows_t[sl], cols_t[sl]])
                nll[sl] = F.cross_entropy(logits.float(), targets[sl], reduction="none").double().cpu()
            at = 0
            for b, e, n in batch:
                token_nll[e - 1 - n : e - 1] = nll[at : at + n].numpy()
                at += n
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return {
        "nll": float(token_nll.sum()),
        "tokens": len(token_nll),
        "windows": len(plan),
        "max_length": max_length,
        "stride": stride,
        "token_nll": token_nll,
    }


def text_perplexity(
    model: torch.nn.Module, tokenizer: Any, text: str, **kwargs: Any
) -> dict[str, Any]:
    """Perplexity and bits per byte of ``text`` (tokenized whole, no special tokens added) with
    :func:`sliding_window_nll`; the keyword arguments pass through. Returns ``perplexity``,
    ``loss`` (nats/token), ``bits_per_byte``, ``tokens``, ``bytes`` (UTF-8 bytes of the
    scored tokens), ``windows``, ``max_length`` and ``stride``."""
    if not text.strip():
        raise DataError("perplexity needs a non-empty text")
    ids = tokenizer.encode(text)
    out = sliding_window_nll(model, ids, **kwargs)
    n_bytes = int(token_byte_lengths(tokenizer)[np.asarray(ids[1:], dtype=np.int64)].sum())
    loss = out["nll"] / out["tokens"]
    return {
        "perplexity": math.exp(min(loss, 50.0)),
        "loss": loss,
        "bits_per_byte": bits_per_byte(out["nll"], n_bytes),
        "tokens": out["tokens"],
        "bytes": n_bytes,
        "windows": out["windows"],
        "max_length": out["max_length"],
        "stride": out["stride"],
    }
