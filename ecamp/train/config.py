"""Pre-training run configuration: YAML presets plus ``key=value`` overrides, validated field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EcampError
from ..models.pretrain import ECAMPPretrainConfig
from ..text.report import MaskingConfig

__all__ = ["ConfigError", "DataConfig", "OptimConfig", "RunConfig", "PretrainRunConfig", "load_config"]


class ConfigError(EcampError, ValueError):
    """A training config file or override is malformed: unknown key, wrong type, impossible value."""


@dataclass
class DataConfig:
    """Where the data is and how samples are made (the authors' values by default, dossier sections 4 and 7)."""

    reports_csv: str = "mimic-cxr-2.0.0-entity-llm.csv"  # columns img_path, report, llm_output
    windows_csv: str | None = "mimic-cxr-2.0.0-attn-label.csv"  # columns label_i, label_j (+ img_path to join)
    image_root: str = ""  # image paths are relative to data_root / image_root
    tokenizer: str | None = None  # tokenizers JSON; None trains one on the training reports
    image_policy: str = "bits"  # how files become intensities (MIMIC-CXR-JPG files are 8-bit: unchanged)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mean: float = 0.4721
    std: float = 0.3037
    hflip: bool = True
    hflip_swaps_sides: bool = False  # authors: a flipped film keeps its report's "left" and "right"
    default_window: str = "center"  # when a sample has no window label: "center" or "random"
    sr_window_follows_augmentation: bool = False  # authors: the window ignores the crop and flip
    max_bad_samples: float = 0.01  # skip unreadable images / empty reports up to this fraction (or count if >= 1)


@dataclass
class OptimConfig:
    """AdamW with the authors' weight-decay groups and per-iteration warm-up + half-cosine schedule."""

    lr: float = 1.5e-4  # absolute, not scaled by batch size (as the authors)
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    batch_size: int = 256  # per process
    accum_iter: int = 8
    epochs: int = 120
    warmup_epochs: float = 40
    schedule_epochs: float = 200  # the cosine horizon; the authors stop at 120 of 200 (final lr = 0.5 x peak)
    clip_grad: float | None = None


@dataclass
class RunConfig:
    seed: int = 42
    num_workers: int = 8
    precision: str = "bf16"  # "fp32", "bf16" (autocast) or "fp16" (autocast + grad scaler)
    save_every: int = 1000  # optimizer steps
    keep_last: int = 3
    log: str = "csv"  # "csv" or "tensorboard"
    init_from: str | None = None  # ImageNet MAE ViT-B/16 weights: a file or "hf-hub:org/repo"


@dataclass
class PretrainRunConfig:
    model: ECAMPPretrainConfig = field(default_factory=ECAMPPretrainConfig)
    text: dict[str, Any] = field(default_factory=dict)  # MaskingConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def masking(self) -> MaskingConfig:
        """The ``text`` section as a :class:`MaskingConfig`, each field type- and range-checked."""
        import typing

        hints = typing.get_type_hints(MaskingConfig)
        names = {f.name for f in dataclasses.fields(MaskingConfig)}
        values = {}
        for key, value in self.text.items():
            if key not in names:
                raise ConfigError(f"Unknown config key 'text.{key}'; known: {sorted(names)}.")
            if key == "entities":
                if not isinstance(value, (list, tuple)) or not all(isinstance(e, str) for e in value):
                    raise ConfigError("text.entities must be a list of words.")
                values[key] = tuple(value)
                continue
            if key == "templates":
                if not isinstance(value, (list, tuple)) or not all(isinstance(t, (list, tuple)) for t in value):
                    raise ConfigError("text.templates must be a list of word lists.")
                values[key] = tuple(tuple(t) for t in value)
                continue
            values[key] = _coerce(value, hints[key], f"text.{key}")
        cfg = dataclasses.replace(MaskingConfig(), **values)
        for key in ("mask_prob", "mask_prob_no_entity", "entity_mask_prob", "context_prob", "template_weight"):
            if not 0 <= getattr(cfg, key) <= 1:
                raise ConfigError(f"text.{key} must be in [0, 1], got {getattr(cfg, key)}.")
        if cfg.num_descriptors < 0:
            raise ConfigError("text.num_descriptors must be >= 0.")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if not isinstance(self.text, dict):
            raise ConfigError("The text section must be a mapping of MaskingConfig fields.")
        m = self.model
        if m.patch_size < 1 or m.img_size < 1:
            raise ConfigError("model.img_size and model.patch_size must be positive.")
        try:
            m.validate()
            self.masking()
        except ConfigError:
            raise
        except (EcampError, TypeError) as e:
            raise ConfigError(str(e)) from e
        o, r, d = self.optim, self.run, self.data
        checks = [
            (m.embed_dim % m.num_heads == 0, "model.embed_dim must be divisible by model.num_heads"),
            (m.text_hidden_size % m.text_heads == 0, "model.text_hidden_size must be divisible by model.text_heads"),
            (m.decoder_embed_dim % m.decoder_num_heads == 0,
             "model.decoder_embed_dim must be divisible by model.decoder_num_heads"),
            (all(0 <= b < 1 for b in o.betas), "optim.betas must be in [0, 1)"),
            (0 <= o.min_lr <= o.lr, "optim.min_lr must be in [0, optim.lr]"),
            (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad must be positive (or null)"),
            (r.num_workers >= 0, "run.num_workers must be >= 0"),
            (d.max_bad_samples >= 0, "data.max_bad_samples must be >= 0"),
            (o.lr > 0, "optim.lr must be positive"),
            (o.batch_size >= 1 and o.accum_iter >= 1, "optim.batch_size and optim.accum_iter must be >= 1"),
            (0 <= o.warmup_epochs <= o.schedule_epochs, "optim.warmup_epochs must be in [0, schedule_epochs]"),
            (o.epochs >= 1, "optim.epochs must be >= 1"),
            (r.precision in ("fp32", "bf16", "fp16"), "run.precision must be fp32, bf16 or fp16"),
            (r.log in ("csv", "tensorboard"), "run.log must be csv or tensorboard"),
            (r.save_every >= 1 and r.keep_last >= 1, "run.save_every and run.keep_last must be >= 1"),
            (d.default_window in ("center", "random"), "data.default_window must be center or random"),
            (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale must satisfy 0 < min <= max <= 1"),
            (d.std > 0, "data.std must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"Invalid config: {msg}.")
        from ..registry import IMAGE_POLICIES

        if d.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"data.image_policy must be one of {IMAGE_POLICIES}.")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check (and for tuples, convert) a YAML value against a dataclass field type."""
    import typing

    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>") or \
            type(typ).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {typ}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}.")
        return value
    return value


def _apply(obj: Any, updates: dict[str, Any], where: str) -> None:
    import typing

    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"Unknown config key {path!r}; known: {sorted(names)}.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping.")
            _apply(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _parse_override(item: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"Override {item!r} must look like key.sub=value.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"Override {item!r}: {e}") from e
    return key.strip().split("."), value


def read_yaml_mapping(path: str | Path, what: str = "Config file") -> dict[str, Any]:
    """A YAML file holding a mapping (``{}`` when empty); :class:`ConfigError` for a missing or malformed file."""
    try:
        import yaml
    except ImportError as e:  # pragma: no cover
        from ..errors import MissingDependencyError

        raise MissingDependencyError("Training configs need PyYAML: pip install \"ecamp[train]\".") from e
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of keys to values.")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainRunConfig:
    """A validated run config: the authors' defaults, then the YAML file, then ``key.sub=value`` overrides."""
    cfg = PretrainRunConfig()
    if path is not None:
        _apply(cfg, read_yaml_mapping(path), "")
    for item in overrides or []:
        keys, value = _parse_override(item)
        nested: Any = value
        for k in reversed(keys[1:]):
            nested = {k: nested}
        if keys[0] == "text":
            if not isinstance(nested, dict):
                raise ConfigError(f"Override {item!r}: set text fields one by one, e.g. text.mask_prob=0.7.")
            cfg.text.update(nested)
            continue
        _apply(cfg, {keys[0]: nested}, "")
    cfg.validate()
    return cfg
