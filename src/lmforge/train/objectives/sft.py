"""Supervised fine-tuning: next-token loss on conversations (through the chat template) or
prompt/completion pairs, by default on the assistant's / completion's tokens only.

Examples become token ids and labels in :func:`lmforge.data.encoding.tokenize_example` (shared
with evaluation's chat loss); pieces outside assistant turns carry no loss (``assistant_only``).

Batches: whole examples, right-padded, with length bucketing (default) or packed: examples
concatenated into rows of ``max_length`` tokens (no padding; attention crosses example
boundaries, as in TRL's plain packing). Evaluation: the mean loss over the held-out
examples' loss-carrying tokens (``val_loss``, ``val_ppl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...data.encoding import tokenize_example
from ...errors import DataError
from ..distributed import DistInfo, all_reduce_sum
from .base import Batch, Objective, eval_batches
from .batching import BatchPlan


@dataclass
class SFTConfig:
    assistant_only: bool = True  # loss on assistant turns (completions) only; false = every token
    max_length: int = 1024  # tokens per example (longer ones are cut, keeping the start)
    packing: bool = False  # concatenate examples into full rows instead of padding
    bucket_by_length: bool = True  # batches of similar lengths (without packing)
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"sft.max_length must be at least 2, got {self.max_length}")


class SFTObjective(Objective):
    name = "sft"

    def __init__(self, train: list[dict], val: list[dict], tokenizer, template, cfg: SFTConfig, context_length: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_len = min(cfg.max_length, context_length)
        self.stats = {"examples": 0, "truncated": 0, "no_loss_tokens": 0}
        self.train = self._encode(train, template, "train")
        self.val = self._encode(val, template, "val") if val else []
        if not self.train:
            raise DataError("no training example keeps any loss-carrying token within sft.max_length")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
        self.loss_tokens = sum(sum(1 for t in lab if t != -100) for _, lab in self.train)

    def _encode(self, examples: list[dict], template, split: str) -> list[tuple[list[int], list[int]]]:
        out = []
        for ex in examples:
            ids, labels = tokenize_example(ex, self.tokenizer, template, self.cfg.assistant_only)
            if len(ids) > self.max_len + 1:
                ids, labels = ids[: self.max_len + 1], labels[: self.max_len + 1]
                if split == "train":
                    self.stats["truncated"] += 1
            if all(t == -100 for t in labels[1:]):
                if split == "train":
                    self.stats["no_loss_tokens"] += 1
                continue
            out.append((ids, labels))
        if split == "train":
            self.stats["examples"] = len(out)
        return out

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.cfg.packing:
            self._pack()
        self.plan = BatchPlan([len(i) for i, _ in self.train], ctx.global_batch_size, ctx.seed, self.cfg.bucket_by_length)

    def _pack(self) -> None:
        """Concatenate the (seeded-shuffled) examples into rows of max_length + 1 tokens."""
        import numpy as np

        order = np.random.default_rng([self.ctx.seed, 7]).permutation(len(self.train))
        ids_all: list[int] = []
        lab_all: list[int] = []
        for k in order:
            ids, labels = self.train[k]
            ids_all += ids
            lab_all += [-100] + labels[1:]  # no loss across the example boundary
        n = self.max_len + 1
        rows = [(ids_all[i : i + n], lab_all[i : i + n]) for i in range(0, len(ids_all) - n + 1, n)]
        if not rows:
            raise DataError(f"packing needs at least {n} tokens of training data; use sft.packing=false")
        self.train = rows

    def _batch(self, items: list[tuple[list[int], list[int]]]) -> Batch:
        T = max(len(i) for i, _ in items) - 1
        x = torch.full((len(items), T), self.pad, dtype=torch.long)
        y = torch.full((len(items), T), -100, dtype=torch.long)
        for r, (ids, labels) in enumerate(items):
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.tensor(labels[1:])
        return {"input_ids": x.to(self.ctx.device), "labels": y.to(self.ctx.device)}

    def train_batch(self, step: int, micro: int) -> Batch:
        idx = self.plan.global_indices(step)[self.ctx.example_slice(micro)]
        return self._batch([self.train[i] for i in idx])

    def batch_weight(self, batch: Batch) -> float:
        return float((batch["labels"] != -100).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = model(batch["input_ids"], batch["labels"])
        return loss, {"tokens": int(batch["input_ids"].numel())}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.val:
            return {}
        info = DistInfo(self.ctx.rank, 0, self.ctx.world_size)
        mine = self.val[self.ctx.rank :: self.ctx.world_size]
        totals = torch.zeros(2, dtype=torch.float64)
        bs = self.cfg.eval_batch_size
        for i in eval_batches(range(0, len(mine), bs), self.ctx):
            batch = self._batch(mine[i : i + bs])
            y = batch["labels"]
            n = int((y != -100).sum())
            with self.ctx.autocast():
                mean = model.loss_from_hidden(model.hidden_states(batch["input_ids"]), y)
            totals[0] += mean.item() * n
            totals[1] += n
        all_reduce_sum(totals, info)
        val_loss = totals[0].item() / max(1.0, totals[1].item())
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": "sft-epochs-v1", **self.stats}
