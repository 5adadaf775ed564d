"""The ECAMP pre-training model's configuration: architecture and objective settings, with the authors' values as
defaults and every deliberate deviation as a named option (``docs/fidelity.md``). Kept apart from the model so that
both towers (:mod:`ecamp.models.pretrain`, :mod:`ecamp.models.text_model`) take it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["ECAMPPretrainConfig"]


@dataclass
class ECAMPPretrainConfig:
    """Architecture and objective settings; the defaults are the authors' (ViT-B/16, 512-d decoder, 6-layer BERT).

    Fidelity options (``False``/default = the authors' behaviour):

    * ``norm_pix_loss``: MAE per-patch normalised targets (the authors pass the flag but never use it).
    * ``pixel_loss_over_region``: average the MIM and SR losses over the masked patches / the SR window instead of
      over all pixels with zeros elsewhere (the authors' means are 0.75x and 0.735x the regional ones).
    * ``sr_final_relu`` (default True): the SR head ends in ReLU although targets are normalised and can be negative.
    * ``encoder_resize_antialias``: antialias the 448 -> 224 downsample of the encoder input.
    * ``tie_word_embeddings``: tie the MLM decoder to the word embeddings (the authors' model lost the tie).
    * ``xavier_text_init`` (default True): xavier-uniform on every BERT linear layer, as the authors' init does.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 4
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    sr_scale: int = 2
    sr_window: int = 12
    vocab_size: int = 30000
    text_hidden_size: int = 768
    text_layers: int = 6
    text_heads: int = 6
    text_intermediate_size: int = 1536
    max_text_len: int = 256
    text_dropout: float = 0.1
    mim_weight: float = 1.0
    sr_weight: float = 1.0
    mlm_weight: float = 1.0
    norm_pix_loss: bool = False
    pixel_loss_over_region: bool = False
    sr_final_relu: bool = True
    encoder_resize_antialias: bool = False
    tie_word_embeddings: bool = False
    xavier_text_init: bool = True

    @classmethod
    def tiny(cls, **overrides: Any) -> ECAMPPretrainConfig:
        """A few-hundred-thousand-parameter model for tests and the CPU demo (64 px encoder input, 4x4 grid)."""
        base = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                    decoder_depth=1, decoder_num_heads=2, sr_window=3, vocab_size=1000, text_hidden_size=64,
                    text_layers=2, text_heads=2, text_intermediate_size=128, max_text_len=64)
        base.update(overrides)
        return cls(**base)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def sr_img_size(self) -> int:
        return self.img_size * self.sr_scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ECAMPPretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"Unknown ECAMPPretrainConfig field(s) {sorted(unknown)}.")
        return cls(**dict(data))

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}.")
        if not 0 < self.sr_window <= self.grid:
            raise ConfigError(f"sr_window {self.sr_window} must be in 1..{self.grid} (the patch grid).")
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}.")
