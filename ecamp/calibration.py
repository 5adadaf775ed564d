"""A classifier's probabilities and decisions from its logits, as its folder's ``config.json`` records them.

``ecamp train finetune`` fits a :class:`~ecamp.config.Calibration` and per-label
:class:`~ecamp.config.OperatingPoints` on the validation split after training and writes both into the ``ecamp``
block of ``best/config.json``; :func:`probabilities` and :func:`decisions` apply them (``ecamp predict``). Fitting
lives with training (the ``calibrate`` module of the downstream training package); this module needs only torch.
"""

from __future__ import annotations

import torch

from .config import Calibration, OperatingPoints
from .errors import ConfigError

__all__ = ["probabilities", "decisions", "activate"]


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Sigmoid (multi-label) or softmax over the last axis (multi-class)."""
    return torch.sigmoid(logits) if activation == "sigmoid" else logits.softmax(-1)


def _check(n: int, values: tuple[float, ...], what: str) -> None:
    if len(values) not in ((1, n) if what == "calibration" else (n,)):
        raise ConfigError(f"The model's {what} has {len(values)} values for its {n} outputs; the folder's "
                          f"config.json was edited or belongs to another model. Re-run `ecamp train finetune`, or "
                          f"remove ecamp.{what} to use the uncalibrated outputs.")


def probabilities(logits: torch.Tensor, activation: str, calibration: Calibration | None = None) -> torch.Tensor:
    """Probabilities ``[N, C]`` of logits ``[N, C]``: ``calibration``'s ``scale * z + bias`` first when given."""
    if calibration is not None:
        _check(logits.shape[-1], calibration.scale, "calibration")
        scale = torch.tensor(calibration.scale, dtype=logits.dtype, device=logits.device)
        bias = torch.tensor(calibration.bias, dtype=logits.dtype, device=logits.device)
        logits = logits * scale + bias
    return activate(logits, activation)


def decisions(probs: torch.Tensor, points: OperatingPoints, *, calibrated: bool) -> torch.Tensor:
    """0/1 decisions ``[N, C]``: each label's probability at or above its threshold (``thresholds`` for calibrated
    probabilities, ``raw_thresholds`` for uncalibrated ones)."""
    values = points.thresholds if calibrated else points.raw_thresholds
    _check(probs.shape[-1], values, "operating_points")
    return (probs >= torch.tensor(values, dtype=probs.dtype, device=probs.device)).to(torch.int64)

