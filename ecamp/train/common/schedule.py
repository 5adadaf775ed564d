"""The one learning-rate schedule of both loops: linear warm-up, then a half-cosine, clamped at its end.

Pre-training evaluates it per iteration on fractional epochs (the authors' ``adjust_learning_rate``); fine-tuning
per optimizer step through ``LambdaLR`` (their ``WarmupCosineSchedule``, whose warm-up counts from step 1). Past
``total`` the value stays at ``floor``: the authors' fine-tuning schedule rose again there (dossier #35).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


def warmup_cosine(t: float, warmup: float, total: float, peak: float, floor: float = 0.0) -> float:
    """The value at ``t``: ``peak * t / warmup`` during warm-up, then a half-cosine from ``peak`` to ``floor``."""
    if t < warmup:
        return peak * t / warmup
    progress = min((t - warmup) / max(total - warmup, 1e-12), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_factor(warmup: int, total: int) -> Callable[[int], float]:
    """``LambdaLR`` factor for optimizer steps: warm-up reaches 1 at step ``warmup - 1`` (it counts the step being
    taken), then the cosine to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return warmup_cosine(step + 1, warmup, total, 1.0)
        return warmup_cosine(step, warmup, total, 1.0)

    return factor
