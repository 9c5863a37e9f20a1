"""The one inference engine: KV cache, sampling, streaming, batching.

Every consumer generates through :class:`InferenceEngine`: the chat REPL and
``lmforge generate``, the server (which drives :meth:`~InferenceEngine.step` from its
own loop for continuous batching), evaluation and adversarial training.

Model of operation (the one of vLLM, on a small scale): requests wait in a queue; each
:meth:`step` runs **one batched decode forward for every decoding sequence**, whatever
their lengths, samples one token per row with the row's own settings and seeded generator,
applies stops, then spends the rest of the step's token budget (``max_step_tokens``) on
**prompt chunks** of the sequences still prefilling (vLLM's chunked prefill), admitting
waiting requests into free cache rows first. A prompt's last chunk also samples its first
token, and the sequence decodes from the next step on. What each request gained comes back
as :class:`StreamDelta` objects. A finished sequence frees its row at once, so a waiting
request takes it on the next step.

A step therefore does bounded work however long a prompt is: a 7,000-token prompt is
prefilled over many steps while the other sequences keep getting a token each step
(before, one such prompt was a single 142 s forward that froze every stream). Chunks are
cut by the sequence's own position only (``max_step_tokens`` tokens, fewer as the prefix
grows so that chunk x prefix stays under ``max_step_attention``), never by what else is in
the batch, so a request's output does not depend on what it was batched with.

A request may carry a ``deadline`` (a ``time.perf_counter()`` value): past it, it is
stopped between two chunks or steps with ``finish_reason == "timeout"``. Logits that are not
finite (a broken model) raise :class:`NonFiniteOutput` instead of being sampled.

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
from typing import TYPE_CHECKING, Any, Literal

import torch

from .. import hardware
from ..errors import ConfigError, LmforgeError
from ..model.cache import KVCache
from .detokenize import IncrementalDetokenizer, StopChecker
from .memory import available_bytes, kv_cache_budget
from .sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    sample,
    token_logprobs,
)

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


Overflow = Literal["error", "truncate", "slide"]


class NonFiniteOutput(LmforgeError):
    """The model produced NaN or infinite logits: it cannot be sampled from."""


@dataclass
class StreamDelta:
    """What one request gained in one engine step."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "timeout" on the last delta


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
    deadline: float = float("inf")  # perf_counter time after which it is stopped ("timeout")
    reserve: int = 0  # cache positions it may come to hold (prompt + max_tokens + virtual tokens)
    row: int = -1  # its cache row while prefilling
    prefilled: int = 0  # prompt tokens already in the cache

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
        max_step_tokens: int = 256,
        max_step_attention: int | None = None,
        kv_cache_bytes: int | None = None,
    ) -> None:
        """``max_step_tokens``: prompt tokens one chunk holds (and roughly what a step spends);
        ``max_step_attention``: chunk x prefix pairs one chunk may attend (default
        ``max_step_tokens x 2048``); ``kv_cache_bytes``: the KV cache's memory budget (default:
        what the settings could use, at most half the memory available at start)."""
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if overflow not in ("error", "truncate", "slide"):
            raise ConfigError(f"overflow must be 'error', 'truncate' or 'slide', got {overflow!r}")
        if max_step_tokens < 1:
            raise ConfigError(f"max_step_tokens must be at least 1, got {max_step_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.vocab_size = self.config.vocab_size
        # Prefix- / prompt-tuned models start every cache row with their virtual tokens.
        self.virtual_tokens = int(getattr(model, "virtual_tokens", 0))
        room = self.config.context_length - self.virtual_tokens
        self.max_seq_len = min(max_seq_len or room, room)
        if self.max_seq_len < 1:
            raise ConfigError(f"max_seq_len must be at least 1, got {max_seq_len}")
        self.overflow = overflow
        self.max_step_tokens = max_step_tokens
        self.max_step_attention = max_step_attention or max_step_tokens * 2048
        emb = model.embed_tokens.weight
        self.device = emb.device
        # fp32 on CPU whatever the model's dtype (lmforge.hardware.kv_cache_dtype: measured)
        cache_dtype = hardware.kv_cache_dtype(emb.dtype, emb.device)
        positions = self.max_seq_len + self.virtual_tokens
        self.bytes_per_position = KVCache.bytes_per_position(self.config, cache_dtype)
        self.kv_budget = kv_cache_budget(self.bytes_per_position, max_batch_size, positions, requested=kv_cache_bytes,
                                         available=available_bytes(emb.device))
        self.cache = KVCache(
            self.config,
            max_batch_size,
            max_len=positions,
            dtype=cache_dtype,
            device=emb.device,
            allocate_rows=1,
        )
        if self.virtual_tokens:
            self.cache.prefix = model.virtual_prefix_kv()
        self.max_batch_size = max_batch_size
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # decoding: running[i] lives in cache row i
        self.prefilling: list[_Sequence] = []  # admitted, prompt partly cached (rows >= len(running)), by arrival
        self.finished: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        self.eos_ids = frozenset(i for i in (getattr(tokenizer, "eot_id", None),) if i is not None)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0, "prefill_chunks": 0}

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
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
    ) -> str:
        """Queue a request; the text or token ids are checked now, so errors surface here.
        ``deadline``: a ``time.perf_counter()`` value after which it stops with "timeout"."""
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
        if any(s.id == rid for s in itertools.chain(self.waiting, self.prefilling, self.running)):
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
        if deadline is not None:
            seq.deadline = deadline
        seq.reserve = min(len(ids) + params.max_tokens, self.max_seq_len) + self.virtual_tokens
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

    @torch.inference_mode()  # the cache may be an inference tensor (grown within a step)
    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Stop a request (client gone); its row is freed now. False if it is not active."""
        for s in list(self.waiting):
            if s.id == request_id:
                self.waiting.remove(s)
                s.finish_reason, s.finished_at = reason, time.perf_counter()
                self.finished[s.id] = s
                return True
        for s in list(self.prefilling):
            if s.id == request_id:
                self._drop_prefill(s, reason)
                return True
        for row, s in enumerate(self.running):
            if s.id == request_id:
                s.finish_reason = reason
                self._release([row])
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def num_running(self) -> int:
        """Sequences holding a cache row (decoding or prefilling)."""
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the step ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Decode one token for every decoding sequence, then prefill prompt chunks (admitting
        waiting requests first) until the step's token budget is spent."""
        deltas = self._expire()
        decode_rows = [r for r, s in enumerate(self.running) if s.finish_reason is None]
        if decode_rows:
            deltas += self._decode(decode_rows)
        self._admit()
        deltas += self._prefill_chunks(self.max_step_tokens - len(decode_rows))
        self._release([r for r, s in enumerate(self.running) if s.finish_reason is not None])
        if not self.prefilling:
            self.cache.shrink(len(self.running))
        return deltas

    def _expire(self) -> list[StreamDelta]:
        """Stop every sequence past its deadline ("timeout")."""
        now = time.perf_counter()
        deltas = []
        for s in [s for s in itertools.chain(self.waiting, self.prefilling, self.running) if s.deadline < now]:
            self.abort(s.id, "timeout")
            deltas.append(StreamDelta(s.id, "", [], [] if s.logprobs is not None else None, "timeout"))
        return deltas

    def _admit(self) -> None:
        """Give waiting requests free rows while the KV-cache budget holds them: every row may
        grow as long as the longest one (one shared capacity), so a request fits when
        ``rows x longest reservation`` stays within the budget."""
        while self.waiting and self.num_running < self.max_batch_size:
            seq = self.waiting[0]
            live = [*self.running, *self.prefilling]
            need = max([seq.reserve, *(s.reserve for s in live)])
            if live and (len(live) + 1) * need * self.bytes_per_position > self.kv_budget:
                return  # waits until rows finish
            self.waiting.popleft()
            taken = {s.row for s in self.prefilling}
            seq.row = next(r for r in range(len(self.running), self.max_batch_size) if r not in taken)
            self.cache.reserve_rows(seq.row + 1)
            self.cache.reset_row(seq.row)
            self.cache.reserve(self.virtual_tokens + len(seq.prompt_ids) + 1)
            seq.prompt_logprobs = [None] if seq.params.prompt_logprobs is not None else None
            self.prefilling.append(seq)

    def _chunk_len(self, seq: _Sequence) -> int:
        """Tokens of ``seq``'s next prompt chunk: a function of its own position only."""
        start = seq.prefilled + self.virtual_tokens
        attn = self.max_step_attention // (start + self.max_step_tokens)
        return max(1, min(len(seq.prompt_ids) - seq.prefilled, self.max_step_tokens, max(16, attn)))

    def _prefill_chunks(self, budget: int) -> list[StreamDelta]:
        """Prompt chunks of the prefilling sequences, oldest first, while the step has budget
        left: ``budget`` tokens and ``max_step_attention`` query x key pairs (at least one chunk
        a step, so prompts progress under a full decode batch)."""
        deltas: list[StreamDelta] = []
        spent = pairs = 0
        for seq in list(self.prefilling):
            while seq.prefilled < len(seq.prompt_ids):
                n = self._chunk_len(seq)
                cost = n * (self.virtual_tokens + seq.prefilled + n)
                if spent and (spent + n > budget or pairs + cost > self.max_step_attention):
                    return deltas
                if seq.deadline < time.perf_counter():
                    self._drop_prefill(seq, "timeout")
                    deltas.append(StreamDelta(seq.id, "", [], [] if seq.logprobs is not None else None, "timeout"))
                    break
                logits = self._prefill_chunk(seq, n)
                spent, pairs = spent + n, pairs + cost
                if seq.prefilled == len(seq.prompt_ids):
                    deltas.append(self._start_decoding(seq, logits))
        return deltas

    def _prefill_chunk(self, seq: _Sequence, n: int) -> torch.Tensor | None:
        """Run ``n`` more prompt tokens of ``seq`` into its row; the logits of the chunk's last
        position when the prompt is complete (and prompt logprobs, chunk by chunk, when asked)."""
        s = seq.prefilled
        idx = torch.tensor([seq.prompt_ids[s : s + n]], device=self.device)
        last = s + n == len(seq.prompt_ids)
        want_all = seq.params.prompt_logprobs is not None
        mode = "all" if want_all else ("last" if last else "none")
        logits = self.model.forward_cached(idx, self.cache.rows(seq.row, seq.row + 1), logits=mode)
        seq.prefilled += n
        self.stats["prompt_tokens"] += n
        self.stats["prefill_chunks"] += 1
        if want_all:
            rows = logits[0].float()
            self._check_finite(rows)
            targets = torch.tensor(seq.prompt_ids[s + 1 : s + n + 1])  # the last prompt token has none
            lp = torch.log_softmax(rows[: len(targets)], dim=-1)
            seq.prompt_logprobs += token_logprobs(lp.cpu(), targets, seq.params.prompt_logprobs)
            logits = logits[:, -1]
        return logits[0].float().cpu() if last else None

    def _start_decoding(self, seq: _Sequence, logits: torch.Tensor) -> StreamDelta:
        """A prompt is in the cache: move its row next to the decoding rows, sample its first token."""
        self.prefilling.remove(seq)
        target = len(self.running)
        if seq.row != target:
            other = next((s for s in self.prefilling if s.row == target), None)
            if other is not None:
                self.cache.swap_rows(seq.row, target)
                other.row = seq.row
            else:
                self.cache.move_row(seq.row, target)
                self.cache.reset_row(seq.row)
        seq.row = -1
        self.running.append(seq)
        self._check_finite(logits)
        return self._advance(seq, logits)

    def _drop_prefill(self, seq: _Sequence, reason: str) -> None:
        self.prefilling.remove(seq)
        self.cache.reset_row(seq.row)
        seq.row = -1
        seq.finish_reason, seq.finished_at = reason, time.perf_counter()
        self.finished[seq.id] = seq

    def _decode(self, rows: list[int]) -> list[StreamDelta]:
        n = len(self.running)  # rows are 0..n-1 (finished ones are released at the end of the step)
        for r in rows:
            if self.cache.lengths[r] - self.virtual_tokens >= self.max_seq_len:  # only under "slide"
                seq = self.running[r]
                window = (seq.prompt_ids + seq.out_ids)[-(self.max_seq_len // 2) :]
                self.cache.reset_row(r)
                self.model.forward_cached(torch.tensor([window[:-1]], device=self.device), self.cache.rows(r, r + 1),
                                          logits="none")
        idx = torch.tensor([[s.out_ids[-1]] for s in self.running], device=self.device)
        logits = self.model.forward_cached(idx, self.cache.rows(0, n)).float().cpu()
        self._check_finite(logits[rows])
        return [self._advance(self.running[r], logits[r]) for r in rows]

    @staticmethod
    def _check_finite(logits: torch.Tensor) -> None:
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutput("the model produced NaN or infinite logits (its weights or its precision are broken)")

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
    max_step_tokens: int = 256,
    kv_cache_bytes: int | None = None,
) -> InferenceEngine:
    """An engine over a checkpoint (or a run's newest), optionally cast or quantized at load.

    ``dtype``: ``float32``, ``bfloat16``, ``float16`` or ``auto``
    (:func:`lmforge.hardware.inference_dtype`: bf16 on GPUs with bf16, fp16 on older ones; on
    a CPU fp32, except weight-quantized models where bf16 is fast).
    """
    from ..checkpoint import Checkpoint

    hardware.inference_dtype(dtype, device)  # a bad value fails before the checkpoint loads
    ckpt = Checkpoint.open(checkpoint)
    return engine_for(ckpt.load_model(device=device, quantize=quantize), ckpt, device=device, dtype=dtype,
                      max_batch_size=max_batch_size, max_seq_len=max_seq_len, overflow=overflow,
                      max_step_tokens=max_step_tokens, kv_cache_bytes=kv_cache_bytes)


def engine_for(model: torch.nn.Module, ckpt: Checkpoint, *, device: str = "cpu", dtype: str = "auto", **engine_args: Any) -> InferenceEngine:
    """An engine over a loaded ``model`` of the opened checkpoint ``ckpt``
    (:class:`lmforge.checkpoint.Checkpoint`: its tokenizer; ``engine.checkpoint`` its path),
    the model cast to the compute dtype of ``dtype`` (see :func:`load_engine`)."""
    quantized = getattr(model, "quantization", None) is not None
    compute = hardware.inference_dtype(dtype, device, quantized=quantized)
    if model.embed_tokens.weight.dtype != compute:  # e.g. a bf16 checkpoint computes in fp32 where bf16 is slow
        model = model.to(compute)
    engine = InferenceEngine(model, ckpt.tokenizer(), **engine_args)
    engine.checkpoint = ckpt.path
    return engine
