"""Virtual-token methods: prompt-tuning (soft prompt embeddings) and prefix-tuning (per-layer
keys and values).

Both put ``P`` learned positions before every sequence (``GPT.virtual_tokens``):

- **Prompt-tuning** (Lester et al. 2021): ``P`` input embeddings prepended to the token
  embeddings (``GPT.soft_prompt``); only they train.
- **Prefix-tuning** (Li & Liang 2021): ``P`` keys and values per layer that every query
  attends to (``Attention.prefix``); nothing else changes.

In training the model runs on the whole sequence. For inference both become cache entries:
:meth:`GPT.virtual_prefix_kv` gives the virtual tokens' per-layer keys/values once and the
inference engine places them at the start of every cache row (``KVCache.prefill_prefix``),
so generation pays nothing per request for them.

Both are initialised from real tokens (the embeddings, or the keys/values the base model
computes, of ``init_text`` or of random vocabulary tokens), PEFT's ``TEXT``/``RANDOM`` init:
starting at the scale of real activations trains far better than N(0, 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SoftPrompt(nn.Module):
    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys and values, (n_layer, n_kv_head, P, head_dim) each."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys = nn.Parameter(keys.detach().clone().float())
        self.prefix_values = nn.Parameter(values.detach().clone().float())

    def layer(self, i: int):
        return lambda: (self.prefix_keys[i], self.prefix_values[i])


def init_token_ids(model, tokenizer, n: int, init_text: str | None, seed: int) -> torch.Tensor:
    """``n`` token ids to initialise virtual tokens: ``init_text`` repeated/cut to ``n``, or random ids."""
    vocab = model.config.vocab_size
    if init_text and tokenizer is not None:
        ids = [i for i in tokenizer.encode(init_text) if i < vocab]
        if ids:
            reps = -(-n // len(ids))
            return torch.tensor((ids * reps)[:n])
    gen = torch.Generator().manual_seed(seed)
    high = min(vocab, getattr(tokenizer, "vocab_size", vocab) if tokenizer is not None else vocab)
    return torch.randint(0, high, (n,), generator=gen)


def attach_soft_prompt(model, ids: torch.Tensor) -> SoftPrompt:
    with torch.no_grad():
        emb = model.embed_tokens.weight[ids.to(model.embed_tokens.weight.device)]
    model.soft_prompt = SoftPrompt(emb)
    model.virtual_tokens = len(ids)
    return model.soft_prompt


@torch.no_grad()
def prefix_init(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the (base) model computes for tokens ``ids`` at positions 0..P-1."""
    from ..cache import KVCache

    w = model.embed_tokens.weight
    cache = KVCache(model.config, 1, capacity=len(ids), dtype=torch.float32, device=w.device)
    was = model.training
    model.eval()
    model.forward_cached(ids.to(w.device)[None], cache.rows(0, 1))
    model.train(was)
    P = len(ids)
    return cache.k[:, 0, :, :P].clone(), cache.v[:, 0, :, :P].clone()


def attach_prefix(model, keys: torch.Tensor, values: torch.Tensor) -> PrefixEncoder:
    enc = PrefixEncoder(keys, values)
    model.prefix_encoder = enc
    for i, layer in enumerate(model.layers):
        layer.attn.prefix = enc.layer(i)  # the declared extension point (a function: no second registration)
    model.virtual_tokens = keys.shape[2]
    return enc


def detach_virtual_tokens(model) -> None:
    """Remove a soft prompt or a prefix from ``model``."""
    for name in ("soft_prompt", "prefix_encoder"):
        if name in model._modules:
            del model._modules[name]
    for layer in model.layers:
        layer.attn.prefix = None
    model.virtual_tokens = 0
