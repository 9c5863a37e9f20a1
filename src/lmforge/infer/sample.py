"""`lmforge sample`: plain autoregressive sampling (greedy, temperature, top-k).

Deliberately small: it recomputes the whole context each step. The inference engine
(KV cache, batching, streaming) replaces it without changing this function's contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class SampleSettings:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    greedy: bool = False
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (or use greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")


@torch.no_grad()
def generate(
    model: torch.nn.Module, prompt: list[int], s: SampleSettings, stop_ids: tuple[int, ...] = ()
) -> list[int]:
    """New token ids continuing ``prompt`` (stops early at a token of ``stop_ids``)."""
    s.validate()
    if not prompt:
        raise ConfigError("the prompt is empty after tokenization")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if s.seed is not None:
        gen.manual_seed(s.seed)
    else:
        gen.seed()
    ctx_len = model.config.context_length
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(s.max_new_tokens):
        logits = model(ids[:, -ctx_len:])[0, -1].float()
        if s.greedy:
            nxt = int(logits.argmax())
        else:
            logits = logits / s.temperature
            if s.top_k is not None and s.top_k < logits.numel():
                kth = torch.topk(logits, s.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        out.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out
