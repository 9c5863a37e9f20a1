"""Sequence classification: cross-entropy on a head over the last real token's hidden state
(``GPT.classify``, the GPT2ForSequenceClassification design), optional class weights.

Evaluation reports accuracy and macro / micro F1 on the held-out examples
(:func:`lmforge.runs.metrics.classification_report`); :meth:`ClassifyObjective.predict`
gives the predictions for the final report and confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ...data.encoding import encode_texts, pad_batch
from ...errors import DataError
from .base import Batch, Objective, eval_batches
from .batching import BatchPlan


@dataclass
class ClassifyConfig:
    template: str = "{text}"  # how an example's text is put to the model
    class_weights: Literal["none", "balanced"] = "none"  # balanced: n / (classes * count), as sklearn
    max_length: int = 256
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError("classify.template must contain {text}")
        if self.max_length < 1:
            raise ValueError(f"classify.max_length must be positive, got {self.max_length}")


class ClassifyObjective(Objective):
    name = "classify"

    def __init__(self, train: list[dict], val: list[dict], labels: list[str], tokenizer, cfg: ClassifyConfig, context_length: int):
        self.cfg, self.labels, self.tokenizer = cfg, labels, tokenizer
        self.index = {label: i for i, label in enumerate(labels)}
        self.max_len = min(cfg.max_length, context_length)
        self.truncated = 0
        self.train = self._encode(train)
        self.val = self._encode(val)
        if not self.train:
            raise DataError("no training examples for classification")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
        counts = np.bincount([y for _, y in self.train], minlength=len(labels)).astype(np.float64)
        self.class_weight = None
        if cfg.class_weights == "balanced":
            w = len(self.train) / (len(labels) * np.maximum(counts, 1))
            self.class_weight = torch.tensor(w, dtype=torch.float32)

    def _encode(self, examples: list[dict]) -> list[tuple[list[int], int]]:
        rows, truncated = encode_texts(self.tokenizer, [ex["text"] for ex in examples], self.cfg.template, self.max_len)
        self.truncated += truncated
        return [(ids, self.index[ex["label"]]) for ex, ids in zip(examples, rows)]

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(ctx.device)
        self.plan = BatchPlan([len(i) for i, _ in self.train], ctx.global_batch_size, ctx.seed, bucket=True)

    def _batch(self, items: list[tuple[list[int], int]]) -> Batch:
        x, lengths = pad_batch([i for i, _ in items], self.pad, self.ctx.device)
        y = torch.tensor([label for _, label in items], device=self.ctx.device)
        return {"input_ids": x, "lengths": lengths, "labels": y}

    def train_batch(self, step: int, micro: int) -> Batch:
        idx = self.plan.global_indices(step)[self.ctx.example_slice(micro)]
        return self._batch([self.train[i] for i in idx])

    def batch_weight(self, batch: Batch) -> float:
        return float(batch["labels"].numel())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["input_ids"], lengths=batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=self.class_weight)
        return loss, {"tokens": int(batch["lengths"].sum())}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, items: list[tuple[list[int], int]] | None = None) -> tuple[list[int], list[int]]:
        """(true, predicted) label indices over ``items`` (default: the held-out set)."""
        items = self.val if items is None else items
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        out = [0] * len(items)
        bs = self.cfg.eval_batch_size
        for i in eval_batches(range(0, len(order), bs), self.ctx):
            chunk = order[i : i + bs]
            batch = self._batch([items[k] for k in chunk])
            with self.ctx.autocast():
                logits = model(batch["input_ids"], lengths=batch["lengths"])
            for k, p in zip(chunk, logits.argmax(-1).tolist()):
                out[k] = p
        return [label for _, label in items], out

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.val:
            return {}
        from ...runs.metrics import classification_report

        true, pred = self.predict(model)
        rep = classification_report(true, pred, self.labels)
        return {"val_accuracy": rep["accuracy"], "val_macro_f1": rep["macro_f1"], "val_micro_f1": rep["micro_f1"]}
