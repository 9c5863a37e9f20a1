"""Sampling settings and the logits pipeline that turns a model's scores into a token.

The order is the one of transformers' ``generate`` and vLLM: penalties on the raw logits
(repetition over prompt and output, presence/frequency over the output), then
temperature, top-k, top-p (nucleus), min-p, then a draw from the row's own seeded
generator. ``temperature == 0`` is greedy. Reported logprobs are the model's own
distribution (log-softmax of the raw logits), before any of these adjustments, which is
what evaluation harnesses expect.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens, in [-2, 2]
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # stop strings (not part of the returned text)
    stop_token_ids: list[int] = field(default_factory=list)  # added to the tokenizer's end-of-text
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: off; 0: the chosen token's; k: and the k most likely
    prompt_logprobs: int | None = None  # same, for every prompt token after the first

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ConfigError with one clear message for any impossible value."""

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be a non-negative integer (0 is off), got {self.top_k!r}")
        if not 0.01 <= self.repetition_penalty <= 100:
            bad(f"repetition_penalty must be in [0.01, 100] (1 is off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop must be a list of non-empty strings")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bad(f"stop token id {t!r} is not in the vocabulary (0..{(vocab_size or 0) - 1})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer, got {self.seed!r}")
        return self


#: Below this a temperature is greedy (vLLM's sampling epsilon): dividing logits by it would
#: overflow to inf and make the softmax NaN.
GREEDY_BELOW = 1e-5


def build_sampling_params(
    *,
    max_tokens: int,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    stop: Iterable[str] = (),
    stop_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    seed: int | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    vocab_size: int | None = None,
) -> SamplingParams:
    """Validated :class:`SamplingParams` from user-facing values: the one place both the
    server (a request's nullable fields) and the CLI (its flags) build them.

    ``None`` means the setting's default (off); a temperature in [0, 1e-5) is greedy (0.0);
    stop token ids are deduplicated and sorted. Raises ConfigError (one line) for any
    impossible value, stop token ids outside ``vocab_size`` included.
    """
    if temperature is None:
        temperature = 1.0
    elif 0 <= temperature < GREEDY_BELOW:
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=0 if top_k is None else top_k,
        top_p=1.0 if top_p is None else top_p,
        min_p=0.0 if min_p is None else min_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        presence_penalty=0.0 if presence_penalty is None else presence_penalty,
        frequency_penalty=0.0 if frequency_penalty is None else frequency_penalty,
        stop=list(stop),
        stop_token_ids=sorted(set(stop_token_ids)),
        ignore_eos=ignore_eos,
        seed=seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    ).validate(vocab_size)


def seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """``n`` copies of ``params`` with seeds seed, seed+1, ... (modulo 2**64, the range of a
    torch generator's seed; unseeded stays unseeded), so a prompt's output does not depend on
    the batch it ran in, and choice ``i`` of a request is reproducible."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i) % (1 << 64)) for i in range(n)]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """``logprobs`` (N, V) log-softmax rows; ``chosen`` (N,) token ids -> one entry per row."""
    picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    ids = chosen.tolist()
    if k:
        top_v, top_i = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in ids]
    return [TokenLogprob(i, p, t) for i, p, t in zip(ids, picked, tops)]


def apply_penalties(
    logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """``counts``: (V,) occurrences in the output; ``seen``: (V,) bool, in prompt or output."""
    if seen is not None and p.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None and (p.presence_penalty or p.frequency_penalty):
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row of logits (V,); removed tokens get -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False  # explicitly: a top_p below fp32's range compares as 0 >= 0
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row of (already penalized) logits."""
    if p.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
