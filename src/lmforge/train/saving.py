"""What every checkpoint of a training run carries besides its weights and training state.

The engine writes checkpoints but does not use these itself: the caller (pretrain, finetune,
adversarial) knows the run's tokenizer, the base model and what else describes the run, and hands
them over once as a :class:`SaveSpec` instead of as four pass-through constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SaveSpec:
    """``tokenizer_file`` is copied into each checkpoint; ``extra`` goes into its config.json
    (with the step and the run's config); ``sidecars_from`` (a checkpoint whose chat template and
    tokenizer sidecar files are copied) and ``base_checkpoint`` (the base an adapter checkpoint names and
    loads first) as in :func:`lmforge.train.state.save_training_checkpoint`."""

    tokenizer_file: str | Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sidecars_from: str | Path | None = None
    base_checkpoint: str | Path | None = None
