"""Learning-rate schedules as a multiplier of the peak rate."""

from __future__ import annotations

import math


def lr_multiplier(step: int, max_steps: int, kind: str, warmup: int, min_ratio: float, decay_fraction: float) -> float:
    """Linear warmup, then cosine to ``min_ratio``, warmup-stable-decay (linear in the last
    ``decay_fraction`` of steps, as in MiniCPM/nanochat) or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind}")
