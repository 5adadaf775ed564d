"""The one learning-rate schedule of both loops: linear warm-up, then a half-cosine, clamped at its end.

Pre-training evaluates it per iteration on fractional epochs (the authors' ``adjust_learning_rate``); fine-tuning
per optimizer step through ``LambdaLR`` (their ``WarmupCosineSchedule``). Past ``total`` the value stays at
``floor``: the authors' fine-tuning schedule rose again there (dossier #35).
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


def warmup_cosine_factor(warmup: int, total: int, *, scheduler_first: bool = False) -> Callable[[int], float]:
    """``LambdaLR`` factor for optimizer steps, by the order the loop steps the scheduler in.

    ``scheduler_first=False`` (ecamp: the scheduler steps after the optimizer, so optimizer step ``k`` = 1, 2, ...
    runs at ``factor(k - 1)``): ``k / warmup`` up to step ``warmup``, then the cosine at ``k - 1``, from the peak at
    step ``warmup + 1`` down to its last, positive value at step ``total``.

    ``scheduler_first=True`` (the authors' ``WarmupCosineSchedule``, ``Classification/utils/scheduler.py:36-40``,
    stepped before the optimizer, ``train.py:462-463``, so step ``k`` runs at ``factor(k)``): ``k / warmup``
    during warm-up, then the cosine at ``k``; step ``total`` runs at 0. Their ``max(1, total - warmup)`` is kept.
    """
    if scheduler_first:
        def authors(step: int) -> float:
            if step < warmup:
                return float(step) / float(max(1.0, warmup))
            progress = min(float(step - warmup) / float(max(1, total - warmup)), 1.0)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

        return authors

    def factor(step: int) -> float:
        if step < warmup:
            return warmup_cosine(step + 1, warmup, total, 1.0)
        return warmup_cosine(step, warmup, total, 1.0)

    return factor
