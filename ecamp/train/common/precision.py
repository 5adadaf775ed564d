"""Mixed precision: one spelling (``fp32`` | ``bf16`` | ``fp16``) for autocast and the gradient scaler."""

from __future__ import annotations

import torch

from ecamp.batching import autocast as _autocast
from ecamp.errors import InvalidArgumentError

__all__ = ["PRECISIONS", "dtype_of", "autocast", "grad_scaler"]

PRECISIONS = ("fp32", "bf16", "fp16")


def dtype_of(precision: str) -> torch.dtype:
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}.") from None


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (nothing for fp32)."""
    return _autocast(device, dtype_of(precision))


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
