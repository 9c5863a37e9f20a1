"""Next-token prediction on prepared token shards (pretraining)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data.shards import load_meta, open_split
from ...errors import ConfigError, DataError
from ...runs.metrics import bits_per_byte, token_byte_lengths
from ...tokenizer import Tokenizer
from ..distributed import DistInfo, all_reduce_sum
from .base import Batch, Objective, eval_batches


class LMObjective(Objective):
    """Random windows of ``context_length + 1`` tokens from the train split.

    Window starts for step ``s`` come from ``default_rng([seed, s])``, so every step's
    global batch is fixed by the seed alone. Evaluation reads non-overlapping windows
    from the start of the val split (up to ``eval_tokens``) and reports loss, perplexity
    and bits per byte.
    """

    name = "lm"

    def __init__(self, data_dir: str | Path, context_length: int, eval_tokens: int = 1 << 17):
        self.data_dir = Path(data_dir)
        self.context_length = context_length
        self.eval_tokens = eval_tokens
        if 0 < eval_tokens < context_length:  # no whole window to evaluate: val_loss would read 0
            raise ConfigError(
                f"train.eval_tokens={eval_tokens} is less than one window of context_length={context_length} "
                f"tokens; use 0 (no evaluation) or at least {context_length}"
            )
        self.meta = load_meta(self.data_dir)
        self.train = open_split(self.data_dir, "train")
        self.val = open_split(self.data_dir, "val")
        need = context_length + 1
        for split, arrays in (("train", self.train), ("val", self.val)):
            longest = max((len(a) for a in arrays), default=0)
            if longest < need and (split == "train" or eval_tokens > 0):
                raise DataError(
                    f"the {split} split of {self.data_dir} has {longest} tokens in its largest shard, fewer than "
                    f"context_length + 1 = {need}; use a smaller model.context_length or more data"
                )
        usable = np.array([max(0, len(a) - need + 1) for a in self.train], dtype=np.float64)
        self._shard_p = usable / usable.sum()
        self._usable = usable.astype(np.int64)
        self._byte_lengths: np.ndarray | None = None

    @property
    def tokenizer_file(self) -> Path:
        return self.data_dir / self.meta.get("tokenizer", "tokenizer.json")

    def _windows(self, arrays: list[np.ndarray], where: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.context_length
        buf = np.stack([arrays[s][o : o + T + 1] for s, o in where]).astype(np.int64)
        t = torch.from_numpy(buf)
        x, y = t[:, :-1], t[:, 1:]
        dev = self.ctx.device
        if dev.type == "cuda":
            return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        return x.contiguous().to(dev), y.contiguous().to(dev)

    def train_batch(self, step: int, micro: int) -> Batch:
        rng = np.random.default_rng([self.ctx.seed, step])
        n = self.ctx.global_batch_size
        shards = rng.choice(len(self.train), size=n, p=self._shard_p) if len(self.train) > 1 else np.zeros(n, int)
        offsets = (rng.random(n) * self._usable[shards]).astype(np.int64)
        sl = self.ctx.example_slice(micro)
        x, y = self._windows(self.train, list(zip(shards[sl].tolist(), offsets[sl].tolist())))
        return {"input_ids": x, "labels": y}

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = model(batch["input_ids"], batch["labels"])
        return loss, {"tokens": batch["input_ids"].numel()}

    def eval_windows(self) -> list[tuple[int, int]]:
        T = self.context_length
        out: list[tuple[int, int]] = []
        budget = self.eval_tokens
        for s, arr in enumerate(self.val):
            for o in range(0, len(arr) - T, T):
                if budget < T:
                    return out
                out.append((s, o))
                budget -= T
        return out

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.eval_tokens <= 0:
            return {}
        if self._byte_lengths is None:
            self._byte_lengths = token_byte_lengths(Tokenizer.from_file(self.tokenizer_file))
        info = DistInfo(self.ctx.rank, 0, self.ctx.world_size)
        mine = self.eval_windows()[self.ctx.rank :: self.ctx.world_size]
        totals = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
        bs = self.ctx.micro_batch_size
        for i in eval_batches(range(0, len(mine), bs), self.ctx):
            x, y = self._windows(self.val, mine[i : i + bs])
            with self.ctx.autocast():
                loss = model(x, y)
            totals[0] += loss.item() * y.numel()
            totals[1] += y.numel()
            totals[2] += int(self._byte_lengths[y.cpu().numpy()].sum())
        all_reduce_sum(totals, info)
        nats, tokens, nbytes = totals.tolist()
        val_loss = nats / max(1.0, tokens)
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bpb": bits_per_byte(nats, int(nbytes)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": "random-windows-v1", "data_dir": str(self.data_dir)}
