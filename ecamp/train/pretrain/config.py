"""Pre-training run configuration: YAML presets plus ``key=value`` overrides, validated field by field by
:mod:`ecamp.schema` (types and keys), then by :meth:`PretrainRunConfig.validate` (ranges and consistency)."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecamp.errors import ConfigError, EcampError
from ecamp.models.pretrain import ECAMPPretrainConfig
from ecamp.schema import from_mapping, update
from ecamp.text.report import MaskingConfig

__all__ = ["ConfigError", "DataConfig", "OptimConfig", "RunConfig", "PretrainRunConfig", "load_config"]


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
    # per process: a worker decodes and augments ~100-200 full-size films/s, and a ViT-B/16 step in bf16 on one
    # current GPU consumes several hundred, so 8 keep the GPU fed; lower it where cores per GPU are fewer
    num_workers: int = 8
    precision: str = "bf16"  # "fp32", "bf16" (autocast) or "fp16" (autocast + grad scaler)
    save_every: int = 1000  # optimizer steps
    keep_last: int = 3
    log: str = "csv"  # "csv" or "tensorboard"
    init_from: str | None = None  # ImageNet MAE ViT-B/16 weights: a file or a model name (hf-hub:org/repo, ...)
    deterministic: bool = False  # torch's deterministic algorithms (GPU); the CPU repeats runs without it
    compile: bool = False  # torch.compile the model's forward and backward (first steps compile; then faster)


@dataclass
class PretrainRunConfig:
    model: ECAMPPretrainConfig = field(default_factory=ECAMPPretrainConfig)
    text: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if isinstance(self.text, Mapping):  # PretrainRunConfig(text={...}): MaskingConfig fields by name
            self.text = from_mapping(MaskingConfig, self.text, source="PretrainRunConfig", where="text")

    def masking(self) -> MaskingConfig:
        """The ``text`` section (the report encoder's masking and weighting settings)."""
        return self.text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Ranges and cross-field rules (the types are checked when the config is read)."""
        m, t = self.model, self.text
        if m.patch_size < 1 or m.img_size < 1:
            raise ConfigError("model.img_size and model.patch_size must be positive.")
        try:
            m.validate()
        except ConfigError:
            raise
        except (EcampError, TypeError) as e:
            raise ConfigError(str(e)) from e
        for key in ("mask_prob", "mask_prob_no_entity", "entity_mask_prob", "context_prob", "template_weight"):
            if not 0 <= getattr(t, key) <= 1:
                raise ConfigError(f"text.{key} must be in [0, 1], got {getattr(t, key)}.")
        if t.num_descriptors < 0:
            raise ConfigError("text.num_descriptors must be >= 0.")
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
        from ecamp.config import POLICIES as IMAGE_POLICIES

        if d.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"data.image_policy must be one of {IMAGE_POLICIES}.")


def _apply(cfg: PretrainRunConfig, data: Any, where: str = "", *, source: str = "config",
           path: object = None) -> None:
    """Apply a mapping of sections (a YAML file, a checkpoint's ``cfg.to_dict()``) onto ``cfg`` in place;
    :class:`ConfigError` naming ``source`` for unknown keys and wrong types."""
    new = update(cfg, data, error=ConfigError, source=source, where=where, path=path)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(new, f.name))


@functools.cache
def _loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.1 reads ``1e-4`` (no dot) as text; read it as the number a config means."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))
    return Loader


def _parse_override(item: str) -> dict[str, Any]:
    """``key.sub=value`` as the nested mapping ``{"key": {"sub": value}}`` (the value read as YAML)."""
    if "=" not in item:
        raise ConfigError(f"Override {item!r} must look like key.sub=value.")
    key, raw = item.split("=", 1)
    from ecamp.schema import load_yaml

    value = load_yaml(raw, source=f"Override {item[:80]!r}", loader=_loader())
    keys = key.strip().split(".")
    if len(keys) == 1 and keys[0] in {f.name for f in dataclasses.fields(PretrainRunConfig)} \
            and not isinstance(value, Mapping):
        example = dataclasses.fields(getattr(PretrainRunConfig(), keys[0]))[0].name
        raise ConfigError(f"Override {item!r}: {keys[0]} is a section; set its fields one by one, e.g. "
                          f"{keys[0]}.{example}=...")
    for k in reversed(keys):
        value = {k: value}
    return value


def read_yaml_mapping(path: str | Path, what: str = "Config file") -> dict[str, Any]:
    """A YAML file holding a mapping (``{}`` when empty); :class:`ConfigError` for a missing or malformed file."""
    try:
        import yaml  # noqa: F401 - the extra's check
    except ImportError as e:  # pragma: no cover
        from ecamp.errors import MissingDependencyError

        raise MissingDependencyError("Training configs need PyYAML: pip install \"ecamp[train]\".") from e
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist.", path=p)
    from ecamp.schema import load_yaml

    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p} is not UTF-8 text ({e.reason} at byte {e.start}).", path=p) from e
    data = load_yaml(text, source=f"{what} {p}", loader=_loader(), path=p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of keys to values.", path=p)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainRunConfig:
    """A validated run config: the authors' defaults, then the YAML file, then ``key.sub=value`` overrides."""
    cfg = PretrainRunConfig()
    if path is not None:
        _apply(cfg, read_yaml_mapping(path), source=f"Config file {path}", path=path)
    for item in overrides or []:
        _apply(cfg, _parse_override(item), source=f"Override {item!r}")
    cfg.validate()
    return cfg
