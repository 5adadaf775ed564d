"""Image encoders: timm ``VisionTransformer`` built from a timm-format ``config.json`` and loaded strictly."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InvalidArgumentError, WeightsMismatchError

__all__ = ["build_encoder", "load_encoder_state_dict", "LoadReport"]

logger = logging.getLogger("ecamp")


def build_encoder(config: Mapping[str, Any], *, num_classes: int | None = None, global_pool: str | None = None,
                  **timm_kwargs: Any) -> nn.Module:
    """Build (randomly initialised) the timm model a timm-format ``config.json`` describes.

    As in ``timm.create_model("hf-hub:...")``, the config's ``model_args`` are defaults that keyword arguments
    override, and ``num_classes`` defaults to the config's.
    """
    import timm

    arch = config.get("architecture")
    if not arch or not timm.is_model(arch):
        raise ConfigError(f"config.json names architecture {arch!r}, which this timm ({timm.__version__}) does not "
                          f"know; upgrade timm or fix the config.")
    kwargs: dict[str, Any] = dict(config.get("model_args") or {})
    kwargs.update(timm_kwargs)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    weights_classes = config.get("num_classes", pretrained_cfg.get("num_classes", 0))
    pretrained_cfg["num_classes"] = weights_classes
    pretrained_cfg["architecture"] = arch
    kwargs["num_classes"] = weights_classes if num_classes is None else num_classes
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    try:
        return timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    except TypeError as e:
        raise InvalidArgumentError(f"timm could not build {arch} with arguments {sorted(kwargs)}: {e}") from e


@dataclass
class LoadReport:
    """What :func:`load_encoder_state_dict` did besides loading matching keys."""

    dropped: list[str] = field(default_factory=list)  # checkpoint keys deliberately not loaded
    fresh: list[str] = field(default_factory=list)  # model keys left at their initialisation


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    return tuple(f"{n}." for n in names)


def load_encoder_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> LoadReport:
    """Load ``state_dict`` strictly, except for a replaced classifier head and the authors' fresh ``fc_norm``.

    timm's own ``checkpoint_filter_fn`` adapts the checkpoint first (e.g. position embeddings for another
    ``img_size``). Any other missing, unexpected or mis-shaped key raises :class:`WeightsMismatchError`.
    """
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    sd = dict(state_dict)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    target = model.state_dict()
    report = LoadReport()
    heads = _head_prefixes(model)
    # A head that does not fit the requested num_classes is replaced, as in timm.
    for key in list(sd):
        if key.startswith(heads) and (key not in target or target[key].shape != sd[key].shape):
            report.dropped.append(key)
            del sd[key]
    # fc_norm=True (the authors' fine-tuning head) replaces the final norm by a fresh norm after pooling.
    uses_fc_norm = not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity)
    if uses_fc_norm and isinstance(getattr(model, "norm", None), nn.Identity):
        for key in [k for k in sd if k.startswith("norm.") and k not in target]:
            report.dropped.append(key)
            del sd[key]
    allowed_fresh = heads + (("fc_norm.",) if uses_fc_norm else ())
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                 for k in sd if k in target and sd[k].shape != target[k].shape]
    not_allowed = [k for k in missing if not k.startswith(allowed_fresh)]
    if not_allowed or unexpected or bad_shape:
        parts = []
        if not_allowed:
            parts.append(f"missing {_abbrev(not_allowed)}")
        if unexpected:
            parts.append(f"unexpected {_abbrev(unexpected)}")
        if bad_shape:
            parts.append(f"mis-shaped {_abbrev(bad_shape)}")
        raise WeightsMismatchError(
            f"Weights from {source} do not fit {type(model).__name__}: {'; '.join(parts)}. Check that config.json "
            f"matches model.safetensors and that keyword arguments such as embed_dim or depth were not changed."
        )
    report.fresh = missing
    model.load_state_dict(sd, strict=False)
    if report.dropped:
        logger.warning("Loaded %s; dropped checkpoint keys %s; freshly initialised %s", source, report.dropped,
                       report.fresh or "none")
    elif report.fresh:
        logger.info("Loaded %s; freshly initialised %s", source, report.fresh)
    model.ecamp_load_report = report
    return report


def _abbrev(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
