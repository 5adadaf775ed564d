"""Model construction: timm image encoders and the ECAMP pre-training model."""

from __future__ import annotations

import importlib
from typing import Any

from .encoder import LoadReport, build_encoder, load_encoder_state_dict

__all__ = ["build_encoder", "load_encoder_state_dict", "LoadReport", "ECAMPPretrainModel", "ECAMPPretrainConfig"]


def __getattr__(name: str) -> Any:  # the pre-training model pulls in transformers: import it on first use
    if name in ("ECAMPPretrainModel", "ECAMPPretrainConfig"):
        return getattr(importlib.import_module(".pretrain", __name__), name)
    raise AttributeError(name)
