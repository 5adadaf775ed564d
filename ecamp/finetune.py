"""Helpers for fine-tuning ECAMP encoders in your own code: layer-wise lr decay, linear probes, dense features.

All of them work on the timm ``VisionTransformer`` that :func:`ecamp.load` returns and build on timm
(``param_groups_layer_decay``, ``forward_intermediates``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError

__all__ = ["layer_decay_param_groups", "FrozenEncoder", "LinearProbe", "multiscale_features", "FeaturePyramid"]


def layer_decay_param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.05, layer_decay: float = 0.75,
                             no_weight_decay: Sequence[str] = ()) -> list[dict]:
    """Optimizer groups with layer-wise learning-rate decay (BEiT/MAE style): block ``i`` of ``n`` gets
    ``lr * layer_decay ** (n + 1 - i)``, the head ``lr``; no weight decay on biases, norms and position embeddings.

    >>> opt = torch.optim.AdamW(layer_decay_param_groups(model, 1e-3, layer_decay=0.65))
    """
    from timm.optim import param_groups_layer_decay

    skip = set(no_weight_decay) | set(getattr(model, "no_weight_decay", lambda: set())())
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=list(skip),
                                      layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return groups


class FrozenEncoder(nn.Module):
    """Base for heads trained on a frozen encoder (linear probe, segmentation, detection): the encoder's parameters
    never train and it never leaves eval mode (no dropout or drop-path), whatever ``train()`` is called with."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's patch tokens after its final norm, ``[B, N, C]`` (prefix tokens dropped)."""
        return self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]

    def token_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` tokens in grid order as a ``[B, C, h, w]`` map on the encoder's patch grid."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.encoder.patch_embed.grid_size)


class LinearProbe(FrozenEncoder):
    """A true linear probe: the encoder is frozen and always in eval mode (no dropout or drop-path in the trunk),
    only the linear head trains. ``forward`` returns logits; ``features`` the frozen pooled embedding."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__(encoder)
        dim = getattr(encoder, "num_features", None)
        if not dim:
            raise InvalidArgumentError("LinearProbe needs an encoder with num_features (a timm model from ecamp.load).")
        if getattr(encoder, "num_classes", 0):
            encoder.reset_classifier(0)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def multiscale_features(model: nn.Module, x: torch.Tensor, indices: Sequence[int] | int = (3, 5, 7, 11),
                        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), norm: bool = True) -> list[torch.Tensor]:
    """Feature maps of several blocks, resampled to several strides, for dense heads (segmentation, detection).

    ``forward_intermediates`` gives ``[B, C, H/16, W/16]`` maps of blocks ``indices``; map ``k`` is resized by
    ``scales[k]`` (bilinear up, max-pool down), so the default gives strides 4, 8, 16 and 32 from a ViT-B/16.
    Parameter-free: put learnable layers (e.g. :class:`FeaturePyramid`) on top when training a dense head.
    """
    idx = [indices] if isinstance(indices, int) else list(indices)
    if len(scales) != len(idx):
        raise InvalidArgumentError(f"Give one scale per block index: {len(idx)} indices, {len(scales)} scales.")
    unique = sorted(set(idx))  # timm returns each block once, in depth order
    maps = model.forward_intermediates(x, indices=unique, norm=norm, output_fmt="NCHW", intermediates_only=True)
    by_block = dict(zip(unique, maps, strict=True))
    out = []
    for i, s in zip(idx, scales, strict=True):
        m = by_block[i]
        if s > 1:
            m = F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
        elif s < 1:
            k = int(round(1 / s))
            m = F.max_pool2d(m, kernel_size=k, stride=k)
        out.append(m)
    return out


class FeaturePyramid(nn.Module):
    """ViTDet-style simple pyramid from one ViT map: learnable 4x/2x up-sampling, identity, 2x down-sampling,
    each followed by a 1x1 projection to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int = 256):
        super().__init__()
        c = in_channels
        self.stages = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2), nn.GELU(), nn.ConvTranspose2d(c // 2, c // 4, 2, 2)),
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        widths = (c // 4, c // 2, c, c)
        self.proj = nn.ModuleList([nn.Conv2d(w, out_channels, 1) for w in widths])

    def forward(self, feature_map: torch.Tensor) -> list[torch.Tensor]:
        return [p(s(feature_map)) for s, p in zip(self.stages, self.proj, strict=True)]
