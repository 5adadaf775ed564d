"""Model construction: timm image encoders, downstream heads and the ECAMP pre-training model."""

from __future__ import annotations

import importlib
from typing import Any

from .encoder import LoadReport, build_encoder, load_encoder_state_dict

_LAZY = {"ECAMPPretrainModel": "pretrain", "ECAMPPretrainConfig": "pretrain_config", "SegmentationModel": "heads",
         "PyramidSegmentationModel": "heads", "DetectionModel": "heads", "heads": None, "pretrain": None,
         "encoder": None, "pretrain_config": None}

__all__ = ["build_encoder", "load_encoder_state_dict", "LoadReport", *_LAZY]


def __getattr__(name: str) -> Any:  # import the heavier modules on first use
    if name not in _LAZY:
        raise AttributeError(f"module 'ecamp.models' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    return module if _LAZY[name] is None else getattr(module, name)
