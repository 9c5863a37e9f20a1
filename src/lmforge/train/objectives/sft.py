"""Supervised fine-tuning: next-token loss on conversations (through the chat template) or
prompt/completion pairs, by default on the assistant's / completion's tokens only.

The conversation is rendered once and the assistant turns are located in the text by
rendering each prefix: ``render(messages[:i], add_generation_prompt=True)`` ends where turn
``i`` starts and ``render(messages[:i+1])`` where it ends, its end-of-turn marker included
(so the model learns to stop). The text is tokenized piece by piece at those boundaries,
which is how generation sees it: the prompt is tokenized up to the assistant header and the
reply's tokens follow. Pieces outside assistant turns carry no loss (``assistant_only``).

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


def _spans_chat(messages: list[dict], template) -> tuple[str, list[tuple[int, int]]]:
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template does not render conversations prefix-consistently, so assistant "
                "tokens cannot be located; use sft.assistant_only=false"
            )
        spans.append((len(before), len(through)))
    return text, spans


def chat_segments(messages: list[dict], tokenizer, template) -> list[tuple[list[int], bool]]:
    """A conversation's tokens as ``(ids, is an assistant turn)`` pieces, in order: the text
    rendered by the template, tokenized piece by piece at the assistant turns' boundaries (each
    assistant piece runs from after its header through its end-of-turn marker)."""
    text, spans = _spans_chat(messages, template)
    pieces, pos = [], 0
    for s, e in [*spans, (len(text), len(text))]:
        for lo, hi, assistant in ((pos, s, False), (s, e, True)):
            if hi > lo:
                pieces.append((tokenizer.encode(text[lo:hi]), assistant))
        pos = e
    return pieces


def tokenize_example(example: dict, tokenizer, template, assistant_only: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) of one SFT example."""
    eot = tokenizer.eot_id
    if "messages" in example:
        ids, labels = [], []
        for piece, assistant in chat_segments(example["messages"], tokenizer, template):
            ids += piece
            labels += piece if (assistant or not assistant_only) else [-100] * len(piece)
        return ids, labels
    prompt, completion = example["prompt"], example["completion"]
    p_ids = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + completion)
    # tokenized together (as generation would see it); the completion starts where the prompt's
    # tokens stop matching
    k = 0
    while k < min(len(p_ids), len(full)) and p_ids[k] == full[k]:
        k += 1
    ids = full + [eot]
    labels = [-100] * k + ids[k:] if assistant_only else list(ids)
    return ids, labels


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
