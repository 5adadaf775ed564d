"""Image encoders: timm ``VisionTransformer`` built from a timm-format ``config.json`` and loaded strictly."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InvalidArgumentError, InvalidWeightsFileError, WeightsMismatchError

__all__ = ["build_encoder", "load_encoder_state_dict", "LoadReport", "check_encoder_config", "safetensors_shapes",
           "ENCODER_BOUNDS"]

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


# What ecamp.load builds at most, checked before anything is allocated: a config.json (or keyword argument) outside
# these bounds is refused instead of exhausting the machine. ViT-g/14 at 1024 px (about 1.1e9 parameters) fits.
ENCODER_BOUNDS = {"img_size": 8192, "patch_size": 256, "in_chans": 64, "embed_dim": 8192, "depth": 128,
                  "num_heads": 256, "mlp_ratio": 64, "num_classes": 1_000_000}
MAX_ENCODER_PARAMS = 4_000_000_000  # rough count of the tensors the fields above would create
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_VIT_DEFAULTS = {"img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 768, "depth": 12, "num_heads": 12,
                 "mlp_ratio": 4.0, "num_classes": 0}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a ``.safetensors`` header (8-byte length, then JSON), without reading the data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error) as e:
        raise InvalidWeightsFileError(f"{path} is not a readable safetensors file: {e}. Re-fetch or re-export it.",
                                      path=path) from e
    return shapes


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    return None


def _check_input(pcfg: Mapping[str, Any], size: Mapping[str, Any], extra: Mapping[str, Any], where: str,
                 config_file: Any) -> None:
    """``pretrained_cfg``'s ``input_size`` must be what the model takes ([in_chans, *img_size]; a ViT refuses any
    other size) and ``mean``/``std`` finite numbers per channel, ``std`` positive (0 gives NaN embeddings)."""
    import math

    def fail(msg: str):
        raise ConfigError(f"{where}: pretrained_cfg.{msg}; fix config.json or re-export the folder.",
                          path=config_file)

    channels = size["in_chans"]
    if "input_size" in pcfg and not ({"img_size", "in_chans"} & set(extra)):
        value = pcfg["input_size"]
        want = [channels, *_pair(size["img_size"])]
        if not isinstance(value, (list, tuple)) or [v for v in value] != want or \
                any(isinstance(v, bool) for v in value):
            fail(f"input_size {value!r:.80} is not the {want} this model takes (in_chans, img_size)")
    for key in ("mean", "std"):
        value = pcfg.get(key)
        if value is None:
            continue
        ok = isinstance(value, (list, tuple)) and len(value) in (1, channels) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (key == "mean" or v > 0)
            for v in value)
        if not ok:
            fail(f"{key} {value!r:.80} is not {channels} finite numbers{' above 0' if key == 'std' else ''}")


def _bounded(name: str, value: Any, fail) -> Any:
    """``value`` of field ``name`` if its type and range are sane; ``fail(message)`` raises otherwise."""
    top = ENCODER_BOUNDS[name]
    if name in ("img_size", "patch_size"):
        pair = _pair(value)
        if pair is None or not all(1 <= v <= top for v in pair):
            fail(f"{value!r} is not a positive size of at most {top} (an int or [height, width])")
        return pair
    low = 0 if name in ("num_classes", "mlp_ratio") else 1
    if name == "mlp_ratio":
        ok = isinstance(value, (int, float)) and 0 < value <= top
    else:
        ok = isinstance(value, int) and low <= value <= top
    if isinstance(value, bool) or not ok:
        fail(f"{value!r} is not a number in {low}..{top}")
    return value


def check_encoder_config(config: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None,
                         weights: str | os.PathLike | None = None, config_file: str | os.PathLike = "config.json",
                         label: str = "") -> None:
    """Refuse an encoder config that would build an absurd model, before anything is allocated.

    Every size (``config.json``'s own ``model_args`` and ``num_classes``, and the keyword ``overrides``) must lie
    within :data:`ENCODER_BOUNDS`, and the estimated parameter count within ``MAX_ENCODER_PARAMS``. The config's
    own values are also checked against the weights' safetensors header (``pos_embed``, ``patch_embed.proj.weight``,
    the ``blocks.N`` count); an override such as ``img_size=448`` is legitimate (timm resamples ``pos_embed``) and
    is bound-checked only. Raises :class:`ConfigError` (the config), :class:`InvalidArgumentError` (an override) or
    :class:`WeightsMismatchError` (config and weights disagree), each naming the file and the field.
    """
    where = f"{config_file}{f' ({label})' if label else ''}"
    args, pcfg = config.get("model_args") or {}, config.get("pretrained_cfg") or {}
    if not isinstance(args, Mapping) or not isinstance(pcfg, Mapping):
        raise ConfigError(f"{where}: model_args and pretrained_cfg must be JSON objects.", path=config_file)
    own = {k: args[k] for k in ENCODER_BOUNDS if k in args}
    if config.get("num_classes", pcfg.get("num_classes")) is not None:  # as build_encoder reads it
        own["num_classes"] = config.get("num_classes", pcfg.get("num_classes"))
    extra = {k: v for k, v in (overrides or {}).items() if k in ENCODER_BOUNDS and v is not None}

    def config_fail(field_name: str):
        key = field_name if field_name == "num_classes" else f"model_args.{field_name}"

        def fail(msg: str):
            raise ConfigError(f"{where}: {key} {msg}; fix config.json, or pass {field_name}=... to override it.",
                              path=config_file)
        return fail

    def override_fail(field_name: str):
        def fail(msg: str):
            raise InvalidArgumentError(f"{field_name}={extra[field_name]!r} for {where}: {msg}.")
        return fail

    checked = {k: _bounded(k, v, config_fail(k)) for k, v in own.items()}
    checked.update({k: _bounded(k, v, override_fail(k)) for k, v in extra.items()})
    size = {**_VIT_DEFAULTS, **checked}
    if size["embed_dim"] % size["num_heads"]:  # timm's Attention asserts it
        key = "num_heads" if "num_heads" in checked else "embed_dim"
        fail = override_fail(key) if key in extra else config_fail(key)
        fail(f"{size[key]!r}: num_heads {size['num_heads']} does not divide embed_dim {size['embed_dim']}")
    (h, w), (ph, pw) = _pair(size["img_size"]), _pair(size["patch_size"])
    dim, depth, ratio = size["embed_dim"], size["depth"], size["mlp_ratio"]
    terms = {"img_size": (h // ph) * (w // pw) * dim, "depth": depth * (4 + 2 * ratio) * dim * dim,
             "num_classes": size["num_classes"] * dim}
    if sum(terms.values()) > MAX_ENCODER_PARAMS:
        field_name = max(terms, key=terms.get)  # the field that makes the model this big
        fail = override_fail(field_name) if field_name in extra else config_fail(field_name)
        fail(f"{size[field_name]!r} gives a model of about {sum(terms.values()):.2g} parameters, over the "
             f"{MAX_ENCODER_PARAMS:.0e} ecamp.load builds")
    if weights is None:
        _check_input(pcfg, size, extra, where, config_file)
        return
    shapes = safetensors_shapes(weights)
    mine = {k: v for k, v in checked.items() if k in own and k not in extra}  # the config's values that are used

    def mismatch(field_name: str, msg: str):
        raise WeightsMismatchError(f"{where}: model_args.{field_name} {mine[field_name]!r} does not match {weights}: "
                                   f"{msg}. The two files do not belong together; re-export the folder.",
                                   path=config_file)

    patch = shapes.get("patch_embed.proj.weight")
    if patch is not None and len(patch) == 4:
        if "embed_dim" in mine and patch[0] != mine["embed_dim"]:
            mismatch("embed_dim", f"patch_embed.proj.weight is {list(patch)} ({patch[0]}-d)")
        if "in_chans" in mine and patch[1] != mine["in_chans"]:
            mismatch("in_chans", f"patch_embed.proj.weight is {list(patch)} ({patch[1]} channels)")
        if "patch_size" in mine and tuple(patch[2:]) != mine["patch_size"]:
            mismatch("patch_size", f"patch_embed.proj.weight is {list(patch)} ({patch[2]}x{patch[3]} patches)")
    pos = shapes.get("pos_embed")
    if pos is not None and len(pos) == 3 and "img_size" in mine:
        (h, w), (ph, pw) = mine["img_size"], (patch[2:] if patch is not None and len(patch) == 4 else (ph, pw))
        grid = (h // ph) * (w // pw)
        if not 0 <= pos[1] - grid <= 16:  # a few prefix tokens (class, register) besides the patch grid
            mismatch("img_size", f"pos_embed holds {pos[1]} positions, not the {grid} patches of a {h}x{w} image")
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    if blocks and "depth" in mine and max(blocks) + 1 != mine["depth"]:
        have = max(blocks) + 1
        missing = f"; missing blocks.{have}." if have < mine["depth"] else ""
        mismatch("depth", f"it holds blocks.0-{have - 1} ({have} blocks){missing}")
    if "num_classes" not in extra:  # a head the config describes must be the one its weights hold
        classifier = pcfg.get("classifier") or "head"
        head = shapes.get(f"{classifier}.weight") if isinstance(classifier, str) else None
        n = checked.get("num_classes", 0)
        if (head is None and n > 0) or (head is not None and (len(head) != 2 or head[0] != n)):
            held = f"{classifier}.weight of shape {list(head)}" if head is not None else "no classifier head"
            raise WeightsMismatchError(f"{where}: num_classes {n} does not match {weights}, which holds {held}. "
                                       f"The two files do not belong together; fix num_classes in config.json or "
                                       f"re-export the folder.", path=config_file)
    _check_input(pcfg, size, extra, where, config_file)  # after the weights: a disagreement with them says more
