"""The weights manifest: schema, loading, names and aliases.

The manifest (``weights_manifest.json``, shipped inside the package) lists every published or planned set of
weights. Its schema is enforced by :func:`parse_manifest`, which turns the JSON into frozen dataclasses through
:mod:`ecamp.schema` (types, unknown and missing fields), then checks what types cannot say (hashes, pinned
revisions, unique aliases), and raises :class:`~ecamp.errors.ManifestError` naming the offending entry and
field. The schema is documented in ``docs/manifest.md``.

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
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Union

from .config import MODALITIES, POLICIES, TASKS
from .errors import ManifestError, UnknownModelError
from .schema import from_mapping

__all__ = [
    "SCHEMA_VERSION",
    "FileEntry",
    "ModelEntry",
    "Manifest",
    "ManifestLike",
    "load_manifest",
    "parse_manifest",
    "list_models",
    "PRETRAINED_CFG_FIELDS",
    "ECAMP_BLOCK_FIELDS",
]

SCHEMA_VERSION = 1
MANIFEST_ENV = "ECAMP_MANIFEST"

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

KINDS = ("encoder", "pretrain")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
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
    kind: str = field(metadata={"choices": KINDS})
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


def _source(source: str) -> str:
    return f"Invalid weights manifest {source} (schema: docs/manifest.md)"


def _err(source: str, where: str, msg: str) -> ManifestError:
    return ManifestError(f"{_source(source)}: {where}: {msg}.", path=None if source.startswith("<") else source)


def _schema(cls: type, data: Any, source: str, where: str) -> Any:
    """``data`` as a ``cls`` instance, through :mod:`ecamp.schema` (types, unknown and missing fields)."""
    return from_mapping(cls, data, error=ManifestError, source=_source(source), where=where, noun="field",
                        path=None if source.startswith("<") else source)


# Blocks of an entry that are stored as plain mappings: these dataclasses only validate them.
@dataclass(frozen=True)
class _Top:
    schema_version: int
    models: dict[str, Any]


@dataclass(frozen=True)
class _PretrainedCfg:
    """timm's pretrained_cfg: the keys timm and ecamp read are typed; timm's descriptive ones are optional."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = field(metadata={"choices": INTERPOLATIONS})
    crop_pct: float
    crop_mode: str
    num_classes: int
    first_conv: Any = None
    classifier: Any = None
    license: Any = None
    paper_ids: Any = None
    paper_name: Any = None
    origin_url: Any = None
    hf_hub_id: Any = None
    notes: Any = None
    description: Any = None
    fixed_input_size: Any = None
    pool_size: Any = None
    test_input_size: Any = None
    architecture: Any = None


@dataclass(frozen=True)
class _EcampBlock:
    modality: str = field(metadata={"choices": MODALITIES})
    image_policy: str = field(metadata={"choices": POLICIES})
    grayscale: bool = False
    fov_crop: bool = False
    notes: str = ""
    # a fine-tuned model's task (ecamp.config.TASKS); absent for encoders and pre-training models
    task: str | None = field(default=None, metadata={"choices": (None, *TASKS)})


# The keys an entry's pretrained_cfg and ecamp block may hold: what a folder's config is filtered to when it becomes
# a manifest entry (ecamp.cards.manifest_entry)
PRETRAINED_CFG_FIELDS = frozenset(f.name for f in fields(_PretrainedCfg))
ECAMP_BLOCK_FIELDS = frozenset(f.name for f in fields(_EcampBlock))


@dataclass(frozen=True)
class _Paper:
    title: str
    doi: str
    arxiv: str = ""
    venue: str = ""
    year: int = 0


@dataclass(frozen=True)
class _Provenance:
    paper: _Paper
    original_file: str | None
    original_url: str | None
    conversion: str
    code: str = ""
    code_commit: str = ""
    notes: str = ""


@dataclass(frozen=True)
class _Training:
    recipe: str | None
    data: str
    notes: str = ""


@dataclass(frozen=True)
class _Metric:
    """A reported number; it is only ever copied from a cited ``source``."""

    task: str
    metric: str
    value: float
    source: str
    split: str = ""
    fraction: float = 0.0
    notes: str = ""


def _parse_entry(name: str, raw: Any, source: str) -> ModelEntry:
    where = f"models[{name!r}]"
    if not _NAME_RE.match(name):
        raise _err(source, where, "names are lower-case letters, digits, '.', '_' and '-'")
    if isinstance(raw, Mapping) and "name" in raw:
        raise _err(source, where, "unknown field 'name' (an entry's name is its key)")
    entry = _schema(ModelEntry, {**raw, "name": name} if isinstance(raw, Mapping) else raw, source, where)
    if not _REPO_RE.match(entry.hf_repo):
        raise _err(source, f"{where}.hf_repo", "expected 'org/name'")
    for alias in entry.aliases:
        if not _NAME_RE.match(alias):
            raise _err(source, f"{where}.aliases", f"bad alias {alias!r}")
    for i, f in enumerate(entry.files):
        if f.sha256 is not None and not _SHA256_RE.match(f.sha256):
            raise _err(source, f"{where}.files[{i}].sha256", "expected 64 lower-case hex digits")
        if f.size is not None and f.size < 0:
            raise _err(source, f"{where}.files[{i}].size", "expected a non-negative integer")
    paths = [f.path for f in entry.files]
    if len(set(paths)) != len(paths):
        raise _err(source, f"{where}.files", "duplicate paths")
    if entry.kind == "encoder":
        missing = [p for p in ENCODER_FILES if p not in paths]
        if missing:
            raise _err(source, f"{where}.files", f"an encoder repo needs {list(ENCODER_FILES)}; missing {missing}")
        _check_pretrained_cfg(_schema(_PretrainedCfg, entry.pretrained_cfg, source, f"{where}.pretrained_cfg"),
                              source, f"{where}.pretrained_cfg")
    if entry.published:
        if entry.revision is None or not _COMMIT_RE.match(entry.revision):
            raise _err(source, f"{where}.revision", "a published entry pins a 40-hex commit")
        unhashed = [f.path for f in entry.files if f.sha256 is None or f.size is None]
        if unhashed:
            raise _err(source, f"{where}.files", f"a published entry needs sha256 and size for {unhashed}")
    _schema(_EcampBlock, entry.ecamp, source, f"{where}.ecamp")
    _schema(_Provenance, entry.provenance, source, f"{where}.provenance")
    _schema(_Training, entry.training, source, f"{where}.training")
    for i, m in enumerate(entry.metrics):
        _schema(_Metric, m, source, f"{where}.metrics[{i}]")
    return entry


def _check_pretrained_cfg(cfg: _PretrainedCfg, source: str, where: str) -> None:
    if not all(v > 0 for v in cfg.input_size):
        raise _err(source, f"{where}.input_size", "expected [channels, height, width] of positive integers")
    for key in ("mean", "std"):
        if len(getattr(cfg, key)) != cfg.input_size[0]:
            raise _err(source, f"{where}.{key}", "expected one number per input channel")
    if not all(v > 0 for v in cfg.std):
        raise _err(source, f"{where}.std", "standard deviations must be positive")
    if not 0 < cfg.crop_pct <= 1:
        raise _err(source, f"{where}.crop_pct", "expected 0 < crop_pct <= 1")


def parse_manifest(data: Any, source: str = "<memory>") -> Manifest:
    """Validate a decoded manifest and return it as a :class:`Manifest`."""
    if isinstance(data, Mapping) and "$comment" in data:  # free text, as in JSON Schema
        if not isinstance(data["$comment"], str):
            raise _err(source, "$comment", "expected a string")
        data = {k: v for k, v in data.items() if k != "$comment"}
    top = _schema(_Top, data, source, "")
    if top.schema_version != SCHEMA_VERSION:
        raise _err(source, "schema_version", f"this ecamp reads version {SCHEMA_VERSION}, "
                   f"got {top.schema_version} (upgrade ecamp?)")
    models = {name: _parse_entry(name, raw, source) for name, raw in top.models.items()}
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
            raise ManifestError(f"Weights manifest {path} is not valid JSON: {e}", path=path) from None
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
                            f"to use the packaged manifest.", path=p)
    return _read(p)


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
