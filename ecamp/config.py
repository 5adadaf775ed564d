"""The ``ecamp`` block of a model: one typed definition, read and written here only.

Every ecamp folder's ``config.json`` carries an ``ecamp`` object beside timm's fields: how its images are read
(modality, intensity policy, grey to three channels, fundus field-of-view crop), which manifest entry it is or
comes from, and, for a fine-tuned model, its task and how it was trained. :class:`EcampCfg` is that object as a
frozen dataclass; a loaded model carries one as ``model.ecamp_cfg``. :meth:`EcampCfg.from_dict` and
:meth:`EcampCfg.to_dict` are the only places the JSON form is parsed and written; keys a newer ecamp wrote are
kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, InvalidWeightsFileError
from .schema import brief

__all__ = ["EcampCfg", "DenseInput", "Calibration", "OperatingPoints", "ModelConfig", "ecamp_cfg_of", "POLICIES",
           "MODALITIES", "TASKS", "DENSE_TASKS",
           "ACTIVATIONS", "FOLDER_KINDS", "PRETRAIN_ARCHITECTURE", "CALIBRATIONS"]

# Intensity policies of the image reader (ecamp.io): how a DICOM or deep image becomes [0, 1] values
POLICIES = ("bits", "minmax", "voi", "mimic-cxr-jpg")
MODALITIES = ("cxr", "fundus")
# What a fine-tuned model does; an encoder (or a full pre-training model) has no task
TASKS = ("classification", "segmentation", "detection")
DENSE_TASKS = ("segmentation", "detection")
ACTIVATIONS = ("sigmoid", "softmax")
# What an ecamp folder holds: a timm encoder or classifier, a dense-head model, or the full pre-training model
FOLDER_KINDS = ("encoder", "classification", "segmentation", "detection", "pretrain")
PRETRAIN_ARCHITECTURE = "ecamp_pretrain"
# How a classifier's logits are calibrated: one temperature (multi-class), or per label a temperature or Platt's
# scale and bias (multi-label)
CALIBRATIONS = ("temperature", "platt")


@dataclass(frozen=True)
class DenseInput:
    """How a segmentation or detection model reads its images: the whole image resized to the input size
    (``resize``: ``"antialias-float"``, or the authors' ``"linear-uint8"``: cv2's bilinear resize of the 8-bit
    image), grey or ``rgb`` (RIGA's colour fundus photos)."""

    resize: str = "antialias-float"
    rgb: bool = False


def _floats(value: Any, where: str, key: str, *, positive: bool = False) -> tuple[float, ...]:
    import math

    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in value):
        what = "positive finite numbers" if positive else "finite numbers"
        raise ConfigError(f"{where}: {key} must be a non-empty list of {what}, got {brief(value)}.")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Calibration:
    """How a classifier's logits ``z`` become calibrated probabilities: ``scale * z + bias`` per output, then the
    model's activation. ``"temperature"``: ``scale = 1 / T`` and no bias (one value for a softmax head, one per
    label for a sigmoid head); ``"platt"``: per label scale and bias (sigmoid heads). Fitted on ``fitted_on``
    (``n`` images) after training; ``scale`` is positive, so a calibration never reorders one output's scores."""

    method: str
    scale: tuple[float, ...]
    bias: tuple[float, ...]
    fitted_on: str = "validation"
    n: int = 0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATIONS:
            raise ConfigError(f"calibration method {brief(self.method)}; use one of {CALIBRATIONS}.")
        if len(self.scale) != len(self.bias):
            raise ConfigError(f"calibration has {len(self.scale)} scales but {len(self.bias)} biases.")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Calibration:
        if not isinstance(data, Mapping) or not {"method", "scale", "bias"} <= set(data) or \
                not set(data) <= {"method", "scale", "bias", "fitted_on", "n"}:
            raise ConfigError(f"{where}: calibration must be an object with method, scale, bias (fitted_on, n), "
                              f"got {data!r:.200}.")
        n = data.get("n", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or not isinstance(data.get("fitted_on", ""), str):
            raise ConfigError(f"{where}: calibration n must be a count and fitted_on a split name.")
        return cls(str(data["method"]), _floats(data["scale"], where, "calibration.scale", positive=True),
                   _floats(data["bias"], where, "calibration.bias"), data.get("fitted_on", "validation"), n)


@dataclass(frozen=True)
class OperatingPoints:
    """Per-label decision thresholds chosen on the validation split by ``rule`` (``"youden"``,
    ``"sensitivity=0.9"``, ``"specificity=0.95"``): ``thresholds`` on the calibrated probabilities,
    ``raw_thresholds`` on the uncalibrated ones (the same rule fitted again), so a decision never depends on
    whether calibration is applied."""

    rule: str
    thresholds: tuple[float, ...]
    raw_thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.thresholds) != len(self.raw_thresholds):
            raise ConfigError(f"operating_points has {len(self.thresholds)} thresholds but "
                              f"{len(self.raw_thresholds)} raw_thresholds.")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OperatingPoints:
        if not isinstance(data, Mapping) or set(data) != {"rule", "thresholds", "raw_thresholds"} or \
                not isinstance(data["rule"], str):
            raise ConfigError(f"{where}: operating_points must be an object with rule, thresholds and "
                              f"raw_thresholds, got {data!r:.200}.")
        return cls(data["rule"], _floats(data["thresholds"], where, "operating_points.thresholds"),
                   _floats(data["raw_thresholds"], where, "operating_points.raw_thresholds"))


@dataclass(frozen=True)
class EcampCfg:
    """ecamp's settings of one model (the ``ecamp`` block of its ``config.json``).

    Image settings: ``modality`` (:data:`MODALITIES` for ECAMP's weights), ``image_policy`` (one of :data:`POLICIES`),
    ``grayscale`` (grey read as three equal channels), ``fov_crop`` (crop a fundus photo to its field of view).
    Identity: ``name`` (the manifest name it is, or was exported as), ``derived_from`` (the manifest entry its
    weights come from, under another name), ``base_model`` (the model a fine-tuning started from),
    ``description``, ``provenance`` (conversion or training record), ``source`` (where this copy was loaded from;
    set by the loader, never written). Fine-tuned models: ``task`` (one of :data:`TASKS`), ``activation`` of a
    classifier (``"sigmoid"`` multi-label, ``"softmax"`` multi-class), its ``calibration`` and ``operating_points``
    (:class:`Calibration`, :class:`OperatingPoints`), ``dense_input`` of a segmentation or detection model,
    ``finetune`` (data set, fraction, mode, best step and score). Full pre-training models:
    ``data`` (how the run read its images).

    :meth:`to_dict` writes the keys a block was read with, in their order (explicit defaults included), then the
    fields set since, so a folder re-saved unchanged keeps its bytes.
    """

    modality: str | None = None
    image_policy: str = "bits"
    grayscale: bool = False
    fov_crop: bool = False
    notes: str = ""
    name: str | None = None
    derived_from: str | None = None
    base_model: str | None = None
    description: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    task: str | None = None
    activation: str | None = None
    dense_input: DenseInput | None = None
    calibration: Calibration | None = None
    operating_points: OperatingPoints | None = None
    finetune: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # the written keys in order: those read, then those set since (a dict's insertion order)
    keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.image_policy not in POLICIES:
            raise ConfigError(f"Unknown image policy {brief(self.image_policy)}; use one of {POLICIES}.")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"Unknown task {brief(self.task)}; use one of {TASKS} (or none for an encoder).")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation is {brief(self.activation)}; use sigmoid or softmax.")

    @property
    def dense(self) -> bool:
        """True for a fine-tuned segmentation or detection model (a dense-head folder)."""
        return self.task in DENSE_TASKS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str = "the ecamp block") -> EcampCfg:
        """Parse the JSON form (``None`` or ``{}`` give the defaults); bad values raise
        :class:`~ecamp.errors.ConfigError` naming ``where``."""
        if data is None:
            return cls()
        if isinstance(data, EcampCfg):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "keys"}
        try:
            values: dict[str, Any] = {k: copy.deepcopy(v) for k, v in data.items() if k in known}
            extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in known}
        except RecursionError as e:
            raise ConfigError(f"{where} is nested too deeply to be an ecamp block.") from e
        keys = tuple(k for k in data if k in known and k != "source")
        for key in ("provenance", "finetune", "data"):
            if values.get(key) is None:
                values.pop(key, None)
            elif not isinstance(values[key], Mapping):
                raise ConfigError(f"{where}: {key} must be a JSON object, got {brief(values[key])}.")
        if values.get("dense_input") is not None:
            dense = values["dense_input"]
            if not isinstance(dense, Mapping) or not set(dense) <= {"resize", "rgb"}:
                raise ConfigError(f"{where}: dense_input must be an object with resize and rgb, got {brief(dense)}.")
            values["dense_input"] = DenseInput(**dense)
        if values.get("calibration") is not None:
            values["calibration"] = Calibration.from_dict(values["calibration"], where)
        if values.get("operating_points") is not None:
            values["operating_points"] = OperatingPoints.from_dict(values["operating_points"], where)
        for key in ("grayscale", "fov_crop"):
            if key in values and not isinstance(values[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {brief(values[key])}.")
        for key in ("modality", "name", "derived_from", "base_model", "description", "task", "activation", "source"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {brief(values[key])}.")
        if "image_policy" in values and not isinstance(values["image_policy"], str):
            raise ConfigError(f"{where}: image_policy must be a string, got {brief(values['image_policy'])}.")
        if "notes" in values and values["notes"] is None:
            values["notes"] = ""
        try:
            return cls(**values, extra=extra, keys=keys)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e

    def to_dict(self, *, with_source: bool = False) -> dict[str, Any]:
        """The JSON form: the keys the block was read or set with, in that order, then fields that differ from
        their defaults, then ``extra``. ``source`` belongs to a loaded copy, not to a folder, so it is left out
        unless asked for."""
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(self)}
        order = [*self.keys, *(k for k in defaults if k not in self.keys and k not in ("extra", "source", "keys")
                               and getattr(self, k) != defaults[k])]
        out: dict[str, Any] = {}
        for key in order:
            value = getattr(self, key)
            typed = isinstance(value, (DenseInput, Calibration, OperatingPoints))
            out[key] = _json_of(value) if typed else copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
        out.update(copy.deepcopy(dict(self.extra)))
        if with_source and self.source is not None:
            out["source"] = self.source
        return out

    def replace(self, **changes: Any) -> EcampCfg:
        """A copy with ``changes``, as a dict update would make it: a new key goes last, ``None`` removes one
        (``finetune`` and ``provenance`` given as mappings replace the old ones)."""
        if isinstance(changes.get("dense_input"), Mapping):
            changes["dense_input"] = DenseInput(**changes["dense_input"])
        keys = [k for k in self.keys if not (k in changes and changes[k] is None)]
        keys += [k for k, v in changes.items() if k not in keys and k != "source" and v is not None]
        return dataclasses.replace(self, **changes, keys=tuple(keys))

    def image_settings(self) -> EcampCfg:
        """Only what decides how images are read (modality, policy, grey, field-of-view crop)."""
        keep = ("modality", "image_policy", "grayscale", "fov_crop", "notes")
        return EcampCfg.from_dict({k: v for k, v in self.to_dict().items() if k in keep})


def _check_labels(data: Mapping[str, Any], where: str, path: Any) -> None:
    """``num_classes`` a count and ``label_names`` one string per output: a name list that does not fit the outputs
    would label every column wrongly."""
    n, names = data.get("num_classes"), data.get("label_names")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise InvalidWeightsFileError(f"{where}: num_classes {brief(n)} is not a count of outputs; fix config.json or "
                                      f"re-export the folder.", path=path)
    if names is None or names == []:
        return
    if not isinstance(names, list) or not all(isinstance(v, str) for v in names) or len(names) != (n or 0):
        what = f"{len(names)} label_names" if isinstance(names, list) else f"label_names {brief(names)}"
        raise InvalidWeightsFileError(f"{where}: {what} for num_classes {n or 0}; give one name (a string) per "
                                      f"output in config.json, or re-export the folder.", path=path)


def _json_of(value: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()}


def ecamp_cfg_of(model: Any) -> EcampCfg:
    """The :class:`EcampCfg` a model carries (``model.ecamp_cfg``), or the defaults for a model without one."""
    return EcampCfg.from_dict(getattr(model, "ecamp_cfg", None))


@dataclass(frozen=True)
class ModelConfig:
    """The ``config.json`` of any ecamp folder, typed: its ``kind`` (one of :data:`FOLDER_KINDS`), the ``ecamp``
    block as an :class:`EcampCfg`, and the timm-format part (the file itself for encoders and classifiers, the
    ``encoder`` block of a segmentation or detection model; None for the full pre-training model). ``data`` is the
    file as read, for the writers of each format (:mod:`ecamp.folders`)."""

    kind: str
    ecamp: EcampCfg
    data: Mapping[str, Any]
    timm: Mapping[str, Any] | None

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "config.json", path: Any = None) -> ModelConfig:
        """Parse a decoded ``config.json``; anything that is not an ecamp or timm-format folder config raises
        :class:`~ecamp.errors.InvalidWeightsFileError` naming ``where``."""
        if not isinstance(data, Mapping):
            raise InvalidWeightsFileError(f"{where} is not a JSON object; it is not a model folder's config.json.",
                                          path=path)
        try:
            ecamp = EcampCfg.from_dict(data.get("ecamp"), where=f"{where}: ecamp")
        except ConfigError as e:
            raise InvalidWeightsFileError(f"{e} Fix config.json or re-export the folder.", path=path) from e
        if data.get("architecture") == PRETRAIN_ARCHITECTURE:
            return cls("pretrain", ecamp, data, None)
        _check_labels(data, where, path)
        if ecamp.dense:
            encoder = data.get("encoder")
            if not isinstance(encoder, Mapping) or not isinstance(encoder.get("architecture"), str):
                raise InvalidWeightsFileError(f"{where} describes a fine-tuned {ecamp.task} model without an "
                                              f"'encoder' block naming its architecture; re-export the folder.",
                                              path=path)
            return cls(ecamp.task, ecamp, data, encoder)
        if not isinstance(data.get("architecture"), str) or not data["architecture"]:
            raise InvalidWeightsFileError(f"{where} has no 'architecture' field naming a timm model; it is not a "
                                          f"timm-format config.json.", path=path)
        n = data.get("num_classes") or 0
        classifier = ecamp.task == "classification" or (ecamp.task is None and isinstance(n, int) and n > 0)
        return cls("classification" if classifier else "encoder", ecamp, data, data)

    @classmethod
    def read(cls, path: Any, label: str = "") -> ModelConfig:
        """Read and parse the ``config.json`` at ``path`` (``label``: the model name it was resolved from)."""
        import json
        from pathlib import Path

        where = f"{path}{f' ({label})' if label else ''}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InvalidWeightsFileError(f"{where} is not a readable config.json: {e}", path=path) from e
        return cls.from_dict(data, where=where, path=path)

    @property
    def dense(self) -> bool:
        return self.kind in DENSE_TASKS

    @property
    def architecture(self) -> str:
        return str((self.timm or self.data)["architecture"])

    @property
    def num_classes(self) -> int:
        return int(self.data.get("num_classes") or 0)

    @property
    def label_names(self) -> list[str]:
        return [str(v) for v in self.data.get("label_names") or []]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` of the image encoder (empty for the pre-training model)."""
        return dict((self.timm or {}).get("pretrained_cfg") or {})
