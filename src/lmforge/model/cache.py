"""The key/value cache: what lets a decoder generate one token in O(1) model passes.

:class:`KVCache` holds keys and values for every layer in preallocated tensors of shape
``(n_layer, rows, n_kv_head, capacity, head_dim)``. Each row is one sequence with its
own length, so rows of different lengths (ragged prompts, requests that joined at
different times) decode together in one batched forward. Capacity grows by doubling up
to the model's context length, so a short chat does not pay for an 8k-token buffer.

A forward pass reads and writes a contiguous range of rows through :meth:`KVCache.rows`;
the inference engine keeps its live sequences in rows ``0..n-1`` (a finished row is
replaced by the last one, :meth:`KVCache.move_row`), so a decode step works on plain
slices, never on gathered copies.

Prefix-tuning (the adaptation stage) puts learned per-layer keys and values in the first
positions of a row with :meth:`KVCache.prefill_prefix`; the model then sees them exactly
like cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LmforgeError


class KVCache:
    def __init__(
        self,
        config,
        rows: int,
        *,
        capacity: int = 256,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if rows < 1:
            raise LmforgeError(f"a KV cache needs at least one row, got {rows}")
        self.config = config
        self.max_len = min(max_len or config.context_length, config.context_length)
        self.n_rows = rows
        capacity = max(1, min(capacity, self.max_len))
        shape = (config.n_layer, rows, config.n_kv_head, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows  # tokens held per row (host ints: no device sync to read)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per row (doubling; never past ``max_len``)."""
        if length > self.max_len:
            raise LmforgeError(f"{length} positions exceed the cache's maximum length {self.max_len}")
        if length <= self.capacity:
            return
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = old.new_zeros(*old.shape[:3], new, old.shape[4])
            grown[:, :, :, : old.shape[3]] = old
            setattr(self, name, grown)

    def rows(self, start: int, stop: int) -> CacheView:
        if not 0 <= start < stop <= self.n_rows:
            raise LmforgeError(f"cache rows {start}:{stop} are outside 0:{self.n_rows}")
        return CacheView(self, start, stop)

    #: Virtual-token keys/values (prefix- or prompt-tuning) that start every row, or None.
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_row(self, row: int) -> None:
        if self.prefix is not None:
            self.prefill_prefix(row, *self.prefix)
        else:
            self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its filled positions) into row ``dst``."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def prefill_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place per-layer prefix keys/values (n_layer, n_kv_head, P, head_dim) at the start of ``row``."""
        P = keys.shape[2]
        self.reserve(P)
        self.k[:, row, :, :P] = keys.to(self.k.dtype)
        self.v[:, row, :, :P] = values.to(self.v.dtype)
        self.lengths[row] = P


@dataclass
class LayerKV:
    """One layer's slice of a :class:`CacheView` during a forward pass."""

    k: torch.Tensor  # (B, n_kv_head, capacity, head_dim), a view into the cache
    v: torch.Tensor
    view: CacheView

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, n_kv_head, T, D); return all keys/values to attend to."""
        vw = self.view
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # e.g. bf16 activations under autocast, fp32 cache
        if vw.uniform_start is not None:
            s = vw.uniform_start
            self.k[:, :, s : s + k.shape[2]] = k
            self.v[:, :, s : s + v.shape[2]] = v
        else:
            index = vw.positions[:, None, :, None].expand_as(k)
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        return self.k[:, :, : vw.span], self.v[:, :, : vw.span]


class CacheView:
    """Rows ``start:stop`` of a cache, prepared for one forward of ``T`` new tokens per row.

    ``begin(T, input_lengths)`` computes what every layer shares: each row's positions
    (its current length + 0..T-1), the key span to attend over, and the attention mask
    (None when a plain causal mask or no mask is exact). ``commit()`` advances the row
    lengths by the real (unpadded) number of tokens.
    """

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        self.cache, self.start, self.stop = cache, start, stop
        self.uniform_start: int | None = None
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.is_causal = False
        self.span = 0
        self._added: list[int] = []

    @property
    def batch_size(self) -> int:
        return self.stop - self.start

    def begin(self, T: int, input_lengths: list[int] | None = None) -> None:
        cache = self.cache
        lengths = cache.lengths[self.start : self.stop]
        self._added = list(input_lengths) if input_lengths is not None else [T] * len(lengths)
        if len(self._added) != len(lengths) or any(not 0 < n <= T for n in self._added):
            raise LmforgeError(f"input lengths {self._added} do not fit {len(lengths)} rows of {T} tokens")
        end = max(lengths) + T
        if end > cache.max_len:
            raise LmforgeError(f"the sequence would reach {end} tokens; the context holds {cache.max_len}")
        cache.reserve(end)
        self.span = end
        device = cache.k.device
        if len(set(lengths)) == 1:
            s = lengths[0]
            self.uniform_start = s
            self.positions = torch.arange(s, s + T, device=device).expand(len(lengths), T)
            # One new token sees every cached one (no mask); a fresh row's prompt is plain causal.
            self.is_causal = T > 1 and s == 0
            self.mask = None
            if T > 1 and s > 0:
                q = torch.arange(s, s + T, device=device)
                self.mask = (torch.arange(end, device=device)[None, :] <= q[:, None])[None, None]
        else:
            self.uniform_start = None
            base = torch.tensor(lengths, device=device)
            self.positions = base[:, None] + torch.arange(T, device=device)[None, :]
            self.is_causal = False
            # Row b's query at position p sees keys 0..p; slots past a row's own length hold
            # stale or other-length data and stay masked.
            self.mask = (torch.arange(end, device=device)[None, None, :] <= self.positions[:, :, None])[:, None]

    def layer(self, i: int) -> LayerKV:
        c = self.cache
        return LayerKV(c.k[i, self.start : self.stop], c.v[i, self.start : self.stop], self)

    def commit(self) -> None:
        for r, n in zip(range(self.start, self.stop), self._added):
            self.cache.lengths[r] += n
