"""The objective plug-in interface of the training engine.

An objective says what a batch is and what the loss is; the engine does the rest
(accumulation, precision, clipping, schedules, eval cadence, checkpoints, logging, DDP).

Batches must be a pure function of ``(seed, step, micro, rank)``: that makes resuming
exact (the data position is just the step) and makes a global batch the same set of
examples whatever the world size, so a 2-process run matches a 1-process run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Batch = dict[str, torch.Tensor]


@dataclass
class RunContext:
    """What an objective needs to know about the run."""

    device: torch.device
    seed: int
    micro_batch_size: int
    grad_accum: int
    rank: int = 0
    world_size: int = 1
    autocast: Callable[[], AbstractContextManager] = field(default=lambda: torch.autocast("cpu", enabled=False))

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def example_slice(self, micro: int) -> slice:
        """Indices (within the global batch) of this rank's examples for micro-step ``micro``."""
        start = (micro * self.world_size + self.rank) * self.micro_batch_size
        return slice(start, start + self.micro_batch_size)


def eval_batches(starts: range, ctx: RunContext | None, desc: str = "eval") -> Any:
    """``starts`` (batch offsets of an evaluation) behind a progress bar on the main rank: an
    evaluation of a 135M-parameter model takes tens of seconds on a CPU, before fine-tuning too,
    and showed nothing meanwhile. Transient (``leave=False``): the logged result replaces it."""
    from tqdm.auto import tqdm

    main = ctx is None or ctx.rank == 0
    return tqdm(starts, desc=desc, unit="batch", leave=False, disable=not main or len(starts) < 2,
                dynamic_ncols=True, mininterval=0.5)


class Objective(ABC):
    """Subclass this for a new training objective and pass it to :class:`Engine`."""

    name: str = "objective"

    def setup(self, ctx: RunContext) -> None:
        """Called once by the engine before training (the run's device, seed, batch shape)."""
        self.ctx = ctx

    @abstractmethod
    def train_batch(self, step: int, micro: int) -> Batch:
        """This rank's micro-batch ``micro`` of optimizer step ``step``, on ``ctx.device``."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mean loss of the batch, and metrics (must include ``tokens``: input tokens processed)."""

    def batch_weight(self, batch: Batch) -> float:
        """How much this micro-batch counts in the step's mean (e.g. its loss-carrying tokens).

        The engine scales each micro-batch's loss by weight / total weight of the step
        across micro-batches and ranks, so the gradient is the true mean over the step.
        """
        return 1.0

    @abstractmethod
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (e.g. ``val_loss``), reduced across ranks; the engine logs them."""

    def state_dict(self) -> dict[str, Any]:
        """Extra data-position state to checkpoint (the step already fixes the batches)."""
        return {}
