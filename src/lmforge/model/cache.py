"""The key/value cache: what lets a decoder generate one token in O(1) model passes.

:class:`KVCache` holds keys and values for every layer in preallocated tensors of shape
``(n_layer, rows, n_kv_head, capacity, head_dim)``. Each row is one sequence with its
own length, so rows of different lengths (ragged prompts, requests that joined at
different times) decode together in one batched forward. Capacity grows by doubling up
to the model's context length, so a short chat does not pay for an 8k-token buffer.

Memory is allocated for the rows in use, not for every row the cache may hold: the row
dimension grows (doubling) when a higher row is first used, and :meth:`KVCache.shrink` gives
memory back when the rows in use and their lengths fall well below what is allocated. All
rows share one capacity, so one long sequence makes every allocated row that long: the
inference engine admits requests against a byte budget (``max(needs) x rows``) for that
reason. Measured on SmolLM2-135M (fp32 cache, 46 KiB a position): 16 preallocated rows grown
to an 8k capacity by one 7,001-token prompt took 6 GB; allocated per row in use, 2 rows x 8k
take 0.75 GB (RELIABILITY.md).

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
        allocate_rows: int | None = None,
    ) -> None:
        """``rows``: the most rows the cache holds; ``allocate_rows``: how many get memory now
        (default all; the rest are allocated when first used)."""
        if rows < 1:
            raise LmforgeError(f"a KV cache needs at least one row, got {rows}")
        self.config = config
        self.max_len = min(max_len or config.context_length, config.context_length)
        self.n_rows = rows
        capacity = max(1, min(capacity, self.max_len))
        alloc = rows if allocate_rows is None else max(1, min(allocate_rows, rows))
        shape = (config.n_layer, alloc, config.n_kv_head, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows  # tokens held per row (host ints: no device sync to read)

    @staticmethod
    def bytes_per_position(config, dtype: torch.dtype) -> int:
        """Bytes of keys and values one position of one row takes over all layers."""
        return 2 * config.n_layer * config.n_kv_head * config.head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def allocated_rows(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def _resize(self, rows: int, capacity: int) -> None:
        """Reallocate to ``rows`` x ``capacity``, keeping what fits of the held positions."""
        keep_r, keep_c = min(rows, self.allocated_rows), min(capacity, self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], rows, old.shape[2], capacity, old.shape[4])
            new[:, :keep_r, :, :keep_c] = old[:, :keep_r, :, :keep_c]
            setattr(self, name, new)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per row (never past ``max_len``): doubling while
        that is enough (a decode growing one token at a time), else exactly what is asked,
        rounded up to 64 (a long prompt: doubling would overshoot by up to 2x)."""
        if length > self.max_len:
            raise LmforgeError(f"{length} positions exceed the cache's maximum length {self.max_len}")
        if length <= self.capacity:
            return
        new = 2 * self.capacity if length <= 2 * self.capacity else -(-length // 64) * 64
        self._resize(self.allocated_rows, min(new, self.max_len))

    def reserve_rows(self, rows: int) -> None:
        """Allocate rows ``0..rows-1`` (doubling the allocated rows, up to ``n_rows``)."""
        if rows > self.n_rows:
            raise LmforgeError(f"cache row {rows - 1} is outside 0:{self.n_rows}")
        if rows > self.allocated_rows:
            self._resize(min(self.n_rows, max(rows, 2 * self.allocated_rows)), self.capacity)

    def shrink(self, rows_in_use: int, min_capacity: int = 256) -> None:
        """Give memory back when the rows ``0..rows_in_use-1`` and the positions they hold use
        under a quarter of the allocation (after a long request or a burst of requests ends)."""
        used = max([1, *self.lengths[: max(rows_in_use, 1)]])
        rows = max(1, rows_in_use)
        want_c = min(self.max_len, max(min_capacity, -(-used * 2 // 64) * 64))
        want_r = min(self.n_rows, max(rows, 1))
        if want_r * want_c * 4 <= self.allocated_rows * self.capacity and (want_r < self.allocated_rows
                                                                           or want_c < self.capacity):
            self._resize(min(want_r, self.allocated_rows), min(want_c, self.capacity))

    def rows(self, start: int, stop: int) -> CacheView:
        if not 0 <= start < stop <= self.n_rows:
            raise LmforgeError(f"cache rows {start}:{stop} are outside 0:{self.n_rows}")
        self.reserve_rows(stop)
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
        self.reserve_rows(max(src, dst) + 1)
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows ``a`` and ``b`` (their filled positions and lengths)."""
        self.reserve_rows(max(a, b) + 1)
        n = max(self.lengths[a], self.lengths[b])
        for t in (self.k, self.v):
            held = t[:, a, :, :n].clone()
            t[:, a, :, :n] = t[:, b, :, :n]
            t[:, b, :, :n] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def prefill_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place per-layer prefix keys/values (n_layer, n_kv_head, P, head_dim) at the start of ``row``."""
        P = keys.shape[2]
        self.reserve_rows(row + 1)
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
