"""The training presets shipped inside the package: ``pretrain/*.yaml`` and ``finetune/*.yaml``.

A preset is addressed by name (``mimic_cxr``, ``cls_chexpert_10_linear-probe``) or by a path to any YAML file, so
an installed wheel runs the same recipes as a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ecamp.errors import ConfigError

__all__ = ["KINDS", "list_presets", "preset_path"]

KINDS = ("pretrain", "finetune")


def _folder(kind: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(kind)))


def list_presets(kind: str | None = None) -> dict[str, list[str]]:
    """Preset names per kind (``{"pretrain": [...], "finetune": [...]}``), sorted."""
    kinds = KINDS if kind is None else (kind,)
    return {k: sorted(p.stem for p in _folder(k).glob("*.yaml")) for k in kinds}


def preset_path(name_or_path: str | Path, kind: str) -> Path:
    """A preset name (``mimic_cxr``, ``pretrain/mimic_cxr``, ``mimic_cxr.yaml``) or an existing file -> its path."""
    if kind not in KINDS:
        raise ConfigError(f"Preset kind must be one of {KINDS}, got {kind!r}.")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = str(name_or_path).removesuffix(".yaml").removesuffix(".yml")
    stem = stem.removeprefix(f"{kind}/")
    candidate = _folder(kind) / f"{stem}.yaml"
    if "/" not in stem and candidate.is_file():
        return candidate
    names = list_presets(kind)[kind]
    raise ConfigError(f"--config {name_or_path}: neither a file nor a {kind} preset; `ecamp train presets` lists "
                      f"them ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}).", path=str(path))
