"""Deterministic batching of variable-length examples for the fine-tuning objectives.

A step's global batch is a pure function of ``(seed, step)`` (the engine's contract): each
epoch is a seeded permutation of the examples. With length bucketing the permutation is cut
into windows of ``bucket_batches`` global batches, each window sorted by length and cut
into batches, and the batches shuffled again, so a batch holds examples of similar length
(little padding) while the order stays random (the "megabatch" scheme of fairseq/HF
``group_by_length``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class BatchPlan:
    def __init__(self, lengths: list[int], global_batch: int, seed: int, bucket: bool, bucket_batches: int = 50):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch = global_batch
        self.seed = seed
        self.bucket = bucket
        self.bucket_batches = bucket_batches
        n = len(lengths)
        # an epoch is whole global batches (examples of the last partial batch wait for the next epoch's order)
        self.per_epoch = max(1, n // global_batch)

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> np.ndarray:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if n < self.global_batch:  # fewer examples than a batch: repeat them
            order = np.resize(order, self.global_batch)
        order = order[: self.per_epoch * self.global_batch]
        if self.bucket:
            window = self.global_batch * self.bucket_batches
            chunks = []
            for start in range(0, len(order), window):
                part = order[start : start + window]
                chunks.append(part[np.argsort(-self.lengths[part], kind="stable")])
            order = np.concatenate(chunks)
            batches = order.reshape(self.per_epoch, self.global_batch)
            batches = batches[rng.permutation(self.per_epoch)]
            order = batches.reshape(-1)
        return order.reshape(self.per_epoch, self.global_batch)

    def global_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        return self._epoch(epoch)[k]
