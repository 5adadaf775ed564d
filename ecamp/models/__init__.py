"""Model construction: timm image encoders (and, later, the ECAMP pre-training model)."""

from .encoder import LoadReport, build_encoder, load_encoder_state_dict

__all__ = ["build_encoder", "load_encoder_state_dict", "LoadReport"]
