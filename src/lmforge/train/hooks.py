"""Engine hooks: what a plug-in beside the objective may add to a training run.

:class:`EngineHook` is the engine's whole interface to them (after torchtune's
``FTRecipeInterface``, a ``typing.Protocol``). Every method has a no-op default, so a hook
subclasses it and writes only what it needs, and the engine calls every method on every hook
without probing for it. Hooks today: AdaLoRA's rank allocation and orthogonality penalty
(:class:`PeftHooks`), the continual-learning penalties (``train/continual.py``), the adversarial
discriminator and the generator's metrics (``train/objectives/adversarial.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class EngineHook(Protocol):
    def extra_loss(self) -> torch.Tensor | None:
        """A term added to every micro-batch's loss (inside autocast), or None."""
        return None

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based), with the gradients still present."""

    def metrics(self) -> dict[str, float]:
        """Logged with the train metrics at each log interval."""
        return {}

    def on_plan(self, total_steps: int) -> None:
        """A time budget set the run's length (schedules that follow it re-plan)."""

    def on_save(self, path: Path) -> None:
        """A checkpoint was written to ``path`` (main rank): state the hook owns goes in it."""

    def on_resume(self, path: Path) -> None:
        """The run resumes from ``path``: state the hook owns comes from it."""


class PeftHooks(EngineHook):
    """``model.peft`` (a :class:`lmforge.model.peft.PeftHandle`) as an engine hook: the model
    package cannot import train's interface, so this adapter gives the handle its no-op
    ``on_save`` / ``on_resume``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def extra_loss(self) -> torch.Tensor | None:
        return self.handle.extra_loss()

    def after_step(self, step: int) -> None:
        self.handle.after_step(step)

    def metrics(self) -> dict[str, float]:
        return self.handle.metrics()

    def on_plan(self, total_steps: int) -> None:
        self.handle.on_plan(total_steps)


def peft_hooks(model: torch.nn.Module) -> list[EngineHook]:
    """The hooks of ``model``'s PEFT method (none for full fine-tuning)."""
    handle = getattr(model, "peft", None)
    return [PeftHooks(handle)] if handle is not None else []
