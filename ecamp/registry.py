"""The weights manifest: schema, loading, names and aliases.

The manifest (``weights_manifest.json``, shipped inside the package) lists every published or planned set of
weights. Its schema is enforced by :func:`parse_manifest`, which turns the JSON into frozen dataclasses and raises
:class:`~ecamp.errors.ManifestError` naming the offending entry and field. The schema is documented in
``docs/manifest.md``.

A different manifest (a private registry or a mirror) can be named with the ``ECAMP_MANIFEST`` environment variable
or the ``manifest=`` argument of the public functions; it is validated the same way.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

from .errors import ManifestError, UnknownModelError

__all__ = [
    "SCHEMA_VERSION",
    "FileEntry",
    "ModelEntry",
    "Manifest",
    "ManifestLike",
    "load_manifest",
    "parse_manifest",
    "resolve_name",
    "list_models",
    "HF_HUB_PREFIX",
    "LOCAL_DIR_PREFIX",
]

SCHEMA_VERSION = 1
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
MANIFEST_ENV = "ECAMP_MANIFEST"

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

KINDS = ("encoder", "pretrain")
MODALITIES = ("cxr", "fundus")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
IMAGE_POLICIES = ("bits", "minmax", "voi", "mimic-cxr-jpg")  # as ecamp.io.POLICIES (io imports numpy; this must not)
# Files an encoder repo must hold: timm reads exactly these two.
ENCODER_FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class FileEntry:
    """One file of a Hub repo; ``sha256`` and ``size`` are null until the file is published."""

    path: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class ModelEntry:
    """One manifest entry. ``pretrained_cfg`` holds timm's field names; ``ecamp`` the medical-image settings."""

    name: str
    aliases: tuple[str, ...]
    kind: str
    description: str
    architecture: str
    model_args: Mapping[str, Any]
    hf_repo: str
    revision: str | None
    published: bool
    files: tuple[FileEntry, ...]
    pretrained_cfg: Mapping[str, Any]
    ecamp: Mapping[str, Any]
    license: str
    license_note: str
    provenance: Mapping[str, Any]
    training: Mapping[str, Any]
    metrics: tuple[Mapping[str, Any], ...]

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def full_pretrained_cfg(self) -> dict[str, Any]:
        """timm-style pretrained_cfg (a fresh copy) with the ecamp block under the ``"ecamp"`` key."""
        cfg = copy.deepcopy(dict(self.pretrained_cfg))
        cfg.setdefault("architecture", self.architecture)
        cfg.setdefault("hf_hub_id", self.hf_repo)
        cfg["tag"] = self.name.split(".", 1)[1] if "." in self.name else self.name
        cfg["ecamp"] = copy.deepcopy(dict(self.ecamp))
        cfg["ecamp"]["name"] = self.name
        return cfg


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: canonical names to entries, plus the alias table."""

    models: Mapping[str, ModelEntry]
    source: str
    schema_version: int = SCHEMA_VERSION
    aliases: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.models)

    def resolve(self, name: str) -> ModelEntry:
        """Entry for a canonical name or an alias (case-insensitive); unknown names suggest close matches."""
        key = name.strip().lower()
        if key in self.models:
            return self.models[key]
        if key in self.aliases:
            return self.models[self.aliases[key]]
        candidates = list(self.models) + list(self.aliases)
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r} in manifest {self.source}.{hint} Known names: "
            f"{', '.join(sorted(candidates))}. Hub repos load as 'hf-hub:org/repo[@revision]' and exported "
            f"folders as 'local-dir:/path'; `ecamp list` shows everything."
        )


ManifestLike = Union[Manifest, str, os.PathLike, None]


def _err(source: str, where: str, msg: str) -> ManifestError:
    return ManifestError(f"Invalid weights manifest {source}: {where}: {msg}. See docs/manifest.md for the schema.")


def _require(obj: Mapping[str, Any], keys: dict[str, type | tuple[type, ...]], source: str, where: str,
             optional: dict[str, type | tuple[type, ...]] | None = None) -> None:
    optional = optional or {}
    if not isinstance(obj, dict):
        raise _err(source, where, f"expected an object, got {type(obj).__name__}")
    unknown = set(obj) - set(keys) - set(optional)
    if unknown:
        raise _err(source, where, f"unknown field(s) {sorted(unknown)}")
    for key in keys:
        if key not in obj:
            raise _err(source, where, f"missing field {key!r}")
    for key, typ in {**keys, **optional}.items():
        if key in obj and not isinstance(obj[key], typ):
            # bool is an int subclass; never accept it where a number is meant
            raise _err(source, f"{where}.{key}", f"expected {_typename(typ)}, got {type(obj[key]).__name__}")
        types = typ if isinstance(typ, tuple) else (typ,)
        if key in obj and isinstance(obj[key], bool) and bool not in types and (int in types or float in types):
            raise _err(source, f"{where}.{key}", "expected a number, got a boolean")


def _typename(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join("null" if t is type(None) else t.__name__ for t in typ)
    return typ.__name__


def _check_pretrained_cfg(cfg: dict, source: str, where: str) -> None:
    _require(cfg, {"input_size": list, "mean": list, "std": list, "interpolation": str,
                   "crop_pct": (int, float), "crop_mode": str, "num_classes": int}, source, where,
             optional={k: object for k in ("first_conv", "classifier", "license", "paper_ids", "paper_name",
                                           "origin_url", "hf_hub_id", "notes", "description", "fixed_input_size",
                                           "pool_size", "test_input_size", "architecture")})
    if len(cfg["input_size"]) != 3 or not all(isinstance(v, int) and v > 0 for v in cfg["input_size"]):
        raise _err(source, f"{where}.input_size", "expected [channels, height, width] of positive integers")
    for key in ("mean", "std"):
        vals = cfg[key]
        if len(vals) != cfg["input_size"][0] or not all(isinstance(v, (int, float)) for v in vals):
            raise _err(source, f"{where}.{key}", "expected one number per input channel")
    if not all(v > 0 for v in cfg["std"]):
        raise _err(source, f"{where}.std", "standard deviations must be positive")
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise _err(source, f"{where}.interpolation", f"expected one of {INTERPOLATIONS}")
    if not 0 < cfg["crop_pct"] <= 1:
        raise _err(source, f"{where}.crop_pct", "expected 0 < crop_pct <= 1")


def _parse_entry(name: str, raw: Any, source: str) -> ModelEntry:
    where = f"models[{name!r}]"
    if not _NAME_RE.match(name):
        raise _err(source, where, "names are lower-case letters, digits, '.', '_' and '-'")
    _require(raw, {
        "aliases": list, "kind": str, "description": str, "architecture": str, "model_args": dict,
        "hf_repo": str, "revision": (str, type(None)), "published": bool, "files": list,
        "pretrained_cfg": dict, "ecamp": dict, "license": str, "license_note": str, "provenance": dict,
        "training": dict, "metrics": list,
    }, source, where)
    if raw["kind"] not in KINDS:
        raise _err(source, f"{where}.kind", f"expected one of {KINDS}")
    if not _REPO_RE.match(raw["hf_repo"]):
        raise _err(source, f"{where}.hf_repo", "expected 'org/name'")
    for alias in raw["aliases"]:
        if not isinstance(alias, str) or not _NAME_RE.match(alias):
            raise _err(source, f"{where}.aliases", f"bad alias {alias!r}")
    files = []
    for i, f in enumerate(raw["files"]):
        fw = f"{where}.files[{i}]"
        _require(f, {"path": str, "sha256": (str, type(None)), "size": (int, type(None))}, source, fw)
        if f["sha256"] is not None and not _SHA256_RE.match(f["sha256"]):
            raise _err(source, f"{fw}.sha256", "expected 64 lower-case hex digits")
        if f["size"] is not None and (isinstance(f["size"], bool) or f["size"] < 0):
            raise _err(source, f"{fw}.size", "expected a non-negative integer")
        files.append(FileEntry(f["path"], f["sha256"], f["size"]))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise _err(source, f"{where}.files", "duplicate paths")
    if raw["kind"] == "encoder":
        missing = [p for p in ENCODER_FILES if p not in paths]
        if missing:
            raise _err(source, f"{where}.files", f"an encoder repo needs {list(ENCODER_FILES)}; missing {missing}")
        _check_pretrained_cfg(raw["pretrained_cfg"], source, f"{where}.pretrained_cfg")
    if raw["published"]:
        if raw["revision"] is None or not _COMMIT_RE.match(raw["revision"]):
            raise _err(source, f"{where}.revision", "a published entry pins a 40-hex commit")
        unhashed = [f.path for f in files if f.sha256 is None or f.size is None]
        if unhashed:
            raise _err(source, f"{where}.files", f"a published entry needs sha256 and size for {unhashed}")
    ecamp_block = raw["ecamp"]
    _require(ecamp_block, {"modality": str, "image_policy": str}, source, f"{where}.ecamp",
             optional={"grayscale": bool, "fov_crop": bool, "notes": str})
    if ecamp_block["image_policy"] not in IMAGE_POLICIES:
        raise _err(source, f"{where}.ecamp.image_policy", f"expected one of {IMAGE_POLICIES}")
    if ecamp_block["modality"] not in MODALITIES:
        raise _err(source, f"{where}.ecamp.modality", f"expected one of {MODALITIES}")
    _require(raw["provenance"], {"paper": dict, "original_file": (str, type(None)),
                                 "original_url": (str, type(None)), "conversion": str}, source,
             f"{where}.provenance", optional={"code": str, "code_commit": str, "notes": str})
    _require(raw["provenance"]["paper"], {"title": str, "doi": str}, source, f"{where}.provenance.paper",
             optional={"arxiv": str, "venue": str, "year": int})
    _require(raw["training"], {"recipe": (str, type(None)), "data": str}, source, f"{where}.training",
             optional={"notes": str})
    for i, m in enumerate(raw["metrics"]):
        # A reported number is only ever copied from a cited source.
        _require(m, {"task": str, "metric": str, "value": (int, float), "source": str}, source,
                 f"{where}.metrics[{i}]", optional={"split": str, "fraction": (int, float), "notes": str})
    return ModelEntry(
        name=name, aliases=tuple(a.lower() for a in raw["aliases"]), kind=raw["kind"],
        description=raw["description"], architecture=raw["architecture"], model_args=dict(raw["model_args"]),
        hf_repo=raw["hf_repo"], revision=raw["revision"], published=raw["published"], files=tuple(files),
        pretrained_cfg=dict(raw["pretrained_cfg"]), ecamp=dict(ecamp_block), license=raw["license"],
        license_note=raw["license_note"], provenance=dict(raw["provenance"]), training=dict(raw["training"]),
        metrics=tuple(dict(m) for m in raw["metrics"]),
    )


def parse_manifest(data: Any, source: str = "<memory>") -> Manifest:
    """Validate a decoded manifest and return it as a :class:`Manifest`."""
    _require(data, {"schema_version": int, "models": dict}, source, "top level",
             optional={"$comment": str})
    if data["schema_version"] != SCHEMA_VERSION:
        raise _err(source, "schema_version", f"this ecamp reads version {SCHEMA_VERSION}, "
                   f"got {data['schema_version']} (upgrade ecamp?)")
    models = {name: _parse_entry(name, raw, source) for name, raw in data["models"].items()}
    aliases: dict[str, str] = {}
    for entry in models.values():
        for alias in entry.aliases:
            if alias in models or alias in aliases:
                raise _err(source, f"models[{entry.name!r}].aliases", f"alias {alias!r} is used twice")
            aliases[alias] = entry.name
    return Manifest(models=models, source=source, aliases=aliases)


_CACHE: dict[tuple[str, float], Manifest] = {}


def _read(path: Path) -> Manifest:
    key = (str(path), path.stat().st_mtime)
    if key not in _CACHE:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ManifestError(f"Weights manifest {path} is not valid JSON: {e}") from None
        _CACHE[key] = parse_manifest(data, source=str(path))
    return _CACHE[key]


def load_manifest(manifest: ManifestLike = None) -> Manifest:
    """The manifest to use: ``manifest`` if given, else ``$ECAMP_MANIFEST``, else the packaged one."""
    if isinstance(manifest, Manifest):
        return manifest
    path = manifest if manifest is not None else os.environ.get(MANIFEST_ENV) or None
    if path is None:
        with resources.as_file(resources.files("ecamp") / "weights_manifest.json") as p:
            return _read(Path(p))
    p = Path(path).expanduser()
    if not p.is_file():
        origin = "the manifest= argument" if manifest is not None else f"${MANIFEST_ENV}"
        raise ManifestError(f"Weights manifest {p} (from {origin}) does not exist; fix the path or unset it "
                            f"to use the packaged manifest.")
    return _read(p)


def resolve_name(name: str, manifest: ManifestLike = None) -> ModelEntry:
    """The manifest entry for a canonical name or alias."""
    return load_manifest(manifest).resolve(name)


def list_models(filter: str = "", *, published_only: bool = False, manifest: ManifestLike = None) -> list[str]:
    """Canonical names and aliases of the manifest, sorted; ``filter`` is a shell-style pattern."""
    man = load_manifest(manifest)
    names = []
    for entry in man.models.values():
        if published_only and not entry.published:
            continue
        names.append(entry.name)
        names.extend(entry.aliases)
    if filter:
        names = [n for n in names if fnmatch.fnmatch(n, filter.lower())]
    return sorted(names)
