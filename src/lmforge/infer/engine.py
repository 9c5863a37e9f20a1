"""The one inference engine: KV cache, sampling, streaming, batching.

Every consumer generates through :class:`InferenceEngine`: the chat REPL and
``lmforge generate``, the server (which drives :meth:`~InferenceEngine.step` from its
own loop for continuous batching), evaluation and adversarial training.

Model of operation (the one of vLLM, on a small scale): requests wait in a queue; each
:meth:`step` admits waiting requests into free cache rows (one prefill forward each,
which also samples their first token), then runs **one batched decode forward for every
running sequence**, whatever their lengths, samples one token per row with the row's own
settings and seeded generator, applies stops, and returns what each request gained as
:class:`StreamDelta` objects. A finished sequence frees its row at once, so a waiting
request takes it on the next step.

Context policy (``overflow``):

- ``"error"`` (default): a prompt that leaves no room to generate is an error; generation
  that reaches the end of the context stops with ``finish_reason == "length"``, as when it
  reaches ``max_tokens``.
- ``"truncate"``: such a prompt is cut from the left to leave room for ``max_tokens``;
  generation still stops at the end of the context.
- ``"slide"``: prompts are cut as with truncate, and generation goes on past the context:
  when a row is full, its last half-context of tokens is encoded again and decoding
  continues from there (nanoGPT's cropping, paid once per half context, not per token).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .. import hardware
from ..errors import ConfigError, LmforgeError
from ..model.cache import KVCache
from .detokenize import IncrementalDetokenizer, StopChecker
from .sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    sample,
    token_logprobs,
)

Overflow = Literal["error", "truncate", "slide"]


@dataclass
class StreamDelta:
    """What one request gained in one engine step."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last delta


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token
    time_to_first_token: float = 0.0
    latency: float = 0.0


@dataclass
class _Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None  # None without a tokenizer: token ids only
    stops: StopChecker
    arrival: float
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    counts: torch.Tensor | None = None  # output token counts (presence/frequency penalties)
    seen: torch.Tensor | None = None  # prompt or output tokens (repetition penalty)
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    text: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)


class InferenceEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        overflow: Overflow = "error",
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if overflow not in ("error", "truncate", "slide"):
            raise ConfigError(f"overflow must be 'error', 'truncate' or 'slide', got {overflow!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.vocab_size = self.config.vocab_size
        # Prefix- / prompt-tuned models start every cache row with their virtual tokens.
        self.virtual_tokens = int(getattr(model, "virtual_tokens", 0))
        room = self.config.context_length - self.virtual_tokens
        self.max_seq_len = min(max_seq_len or room, room)
        self.overflow = overflow
        emb = model.embed_tokens.weight
        self.device = emb.device
        # fp32 on CPU whatever the model's dtype (lmforge.hardware.kv_cache_dtype: measured)
        cache_dtype = hardware.kv_cache_dtype(emb.dtype, emb.device)
        self.cache = KVCache(
            self.config,
            max_batch_size,
            max_len=self.max_seq_len + self.virtual_tokens,
            dtype=cache_dtype,
            device=emb.device,
        )
        if self.virtual_tokens:
            self.cache.prefix = model.virtual_prefix_kv()
        self.max_batch_size = max_batch_size
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # running[i] lives in cache row i
        self.finished: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        self.eos_ids = frozenset(i for i in (getattr(tokenizer, "eot_id", None),) if i is not None)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0}

    # ---- requests -------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise LmforgeError("the prompt is empty")
            if self.tokenizer is None:
                raise LmforgeError("this engine has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise LmforgeError(f"prompt token ids {bad[:3]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if not ids:
            raise LmforgeError("the prompt is empty after tokenization")
        return ids

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; the text or token ids are checked now, so errors surface here."""
        params = (params or SamplingParams()).validate(self.vocab_size)
        ids = self.encode_prompt(prompt)
        room = self.max_seq_len - len(ids)
        if room < 1:
            if self.overflow == "error":
                raise LmforgeError(
                    f"the prompt has {len(ids)} tokens; the context holds {self.max_seq_len} "
                    "(at least one more is needed to generate)"
                )
            ids = ids[-max(1, self.max_seq_len - params.max_tokens) :]
        rid = request_id or f"req-{next(self._ids)}"
        if any(s.id == rid for s in itertools.chain(self.waiting, self.running)):
            raise LmforgeError(f"request id {rid!r} is already in use")
        gen = torch.Generator(device="cpu")
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq = _Sequence(
            rid, ids, params, gen, stop_ids, IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None,
            StopChecker(params.stop),
            time.perf_counter(),
        )
        if params.logprobs is not None:
            seq.logprobs = []
        if params.presence_penalty or params.frequency_penalty:
            seq.counts = torch.zeros(self.vocab_size)
        if params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            seq.seen[torch.tensor(ids)] = True
        self.waiting.append(seq)
        self.stats["requests"] += 1
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request (client gone); its row is freed now. False if it is not active."""
        for s in list(self.waiting):
            if s.id == request_id:
                self.waiting.remove(s)
                s.finish_reason, s.finished_at = "abort", time.perf_counter()
                self.finished[s.id] = s
                return True
        for row, s in enumerate(self.running):
            if s.id == request_id:
                s.finish_reason = "abort"
                self._release([row])
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the step ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Admit waiting requests into free rows (prefill), then decode one token for all."""
        deltas: list[StreamDelta] = []
        decode_rows = list(range(len(self.running)))
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            row = len(self.running)
            self.running.append(seq)
            deltas.append(self._prefill(seq, row))
        if decode_rows:
            deltas += self._decode(decode_rows)
        self._release([r for r, s in enumerate(self.running) if s.finish_reason is not None])
        return deltas

    def _prefill(self, seq: _Sequence, row: int) -> StreamDelta:
        self.cache.reset_row(row)
        idx = torch.tensor([seq.prompt_ids], device=self.device)
        want_all = seq.params.prompt_logprobs is not None
        logits = self.model.forward_cached(idx, self.cache.rows(row, row + 1), logits="all" if want_all else "last")
        self.stats["prompt_tokens"] += len(seq.prompt_ids)
        if want_all:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            targets = torch.tensor(seq.prompt_ids[1:])
            seq.prompt_logprobs = [None] + token_logprobs(lp[:-1].cpu(), targets, seq.params.prompt_logprobs)
            logits = logits[:, -1]
        return self._advance(seq, logits[0].float().cpu())

    def _decode(self, rows: list[int]) -> list[StreamDelta]:
        n = len(rows)  # rows are 0..n-1: the sequences that were running before this step
        for r in rows:
            if self.cache.lengths[r] - self.virtual_tokens >= self.max_seq_len:  # only under "slide"
                seq = self.running[r]
                window = (seq.prompt_ids + seq.out_ids)[-(self.max_seq_len // 2) :]
                self.cache.reset_row(r)
                self.model.forward_cached(torch.tensor([window[:-1]], device=self.device), self.cache.rows(r, r + 1))
        idx = torch.tensor([[self.running[r].out_ids[-1]] for r in rows], device=self.device)
        logits = self.model.forward_cached(idx, self.cache.rows(0, n)).float().cpu()
        return [self._advance(self.running[r], logits[r]) for r in rows]

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> StreamDelta:
        """Sample the next token of ``seq`` from its logits row and apply the stop rules."""
        p = seq.params
        token = sample(apply_penalties(logits, p, seq.counts, seq.seen), p, seq.generator)
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.out_ids.append(token)
        self.stats["generation_tokens"] += 1
        lps = None
        if seq.logprobs is not None:
            lps = token_logprobs(torch.log_softmax(logits, -1)[None], torch.tensor([token]), p.logprobs)
            seq.logprobs += lps
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.seen is not None:
            seq.seen[token] = True
        text = ""
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
        else:
            text = seq.stops.add(seq.detok.add(token) if seq.detok else "")
            if seq.stops.stopped:
                seq.finish_reason = "stop"
            elif len(seq.out_ids) >= p.max_tokens or (seq.length >= self.max_seq_len and self.overflow != "slide"):
                seq.finish_reason = "length"
        if seq.finish_reason is not None and not seq.stops.stopped:
            text += seq.stops.add(seq.detok.flush() if seq.detok else "")
            text += seq.stops.flush()
        seq.text += text
        return StreamDelta(seq.id, text, [token], lps, seq.finish_reason)

    def _release(self, rows: list[int]) -> None:
        """Free finished rows; the last running sequence moves into each freed row."""
        for row in sorted(rows, reverse=True):
            seq = self.running[row]
            seq.finished_at = time.perf_counter()
            self.finished[seq.id] = seq
            last = len(self.running) - 1
            if row != last:
                self.cache.move_row(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
            self.cache.reset_row(last)

    # ---- conveniences --------------------------------------------------------------------
    def pop_completion(self, request_id: str) -> Completion:
        s = self.finished.pop(request_id)
        return Completion(
            s.id, s.prompt_ids, s.out_ids, s.text, s.finish_reason or "abort", s.logprobs, s.prompt_logprobs,
            (s.first_token_at or s.arrival) - s.arrival, (s.finished_at or s.arrival) - s.arrival,
        )

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """Complete every prompt (batched up to ``max_batch_size`` at a time), in order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(plist)} sampling settings")
        ids = [self.add_request(pr, pa) for pr, pa in zip(prompts, plist)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while self.has_unfinished():
            for d in self.step():
                if bar is not None and d.finish_reason is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        return [self.pop_completion(i) for i in ids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Generate one completion, yielding each step's new text and tokens."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for d in self.step():
                    if d.request_id == rid:
                        yield d
                        if d.finish_reason is not None:
                            self.finished.pop(rid, None)
                            return
        finally:
            if self.abort(rid):
                self.finished.pop(rid, None)


def load_engine(
    checkpoint: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    quantize: str | None = None,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    overflow: Overflow = "error",
) -> InferenceEngine:
    """An engine over a checkpoint (or a run's newest), optionally cast or quantized at load.

    ``dtype``: ``float32``, ``bfloat16``, ``float16`` or ``auto``
    (:func:`lmforge.hardware.inference_dtype`: bf16 on GPUs with bf16, fp16 on older ones; on
    a CPU fp32, except weight-quantized models where bf16 is fast).
    """
    from ..tokenizer import Tokenizer
    from ..train.checkpoint import load_model

    hardware.inference_dtype(dtype, device)  # a bad value fails before the checkpoint loads
    model, path = load_model(checkpoint, device=device, quantize=quantize)
    quantized = getattr(model, "quantization", None) is not None
    compute = hardware.inference_dtype(dtype, device, quantized=quantized)
    if model.embed_tokens.weight.dtype != compute:  # e.g. a bf16 checkpoint computes in fp32 where bf16 is slow
        model = model.to(compute)
    tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    engine = InferenceEngine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, overflow=overflow)
    engine.checkpoint = path
    return engine
