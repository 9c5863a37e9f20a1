"""Training objectives: each a small plug-in (batch format + loss) for the one engine."""

from .base import Batch, Objective, RunContext
from .lm import LMObjective

__all__ = ["Batch", "Objective", "RunContext", "LMObjective"]
