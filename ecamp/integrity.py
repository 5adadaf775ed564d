"""Check a model's files without touching the network (``ecamp verify``): cached Hub files are re-hashed against
the manifest (or the Hub's LFS sha256), folders and the local store are checked for completeness and against their
own ``config.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumMismatchError, EcampError, ManifestError, NotCachedError
from .hub import file_problem, hub_download, verify_lfs_blob
from .registry import ManifestLike, ModelEntry, load_manifest

__all__ = ["verify", "VerifyResult"]


@dataclass(frozen=True)
class VerifyResult:
    name: str
    file: str
    status: str  # "ok" | "mismatch" | "not-cached" | "unpublished" | "no-hash"
    path: Path | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "mismatch"


def _verify_entry(entry: ModelEntry, cache_dir: str | os.PathLike | None) -> list[VerifyResult]:
    if not entry.published:
        return [VerifyResult(entry.name, "*", "unpublished", detail="weights not on the Hub yet")]
    results = []
    for f in entry.files:
        try:
            path = hub_download(entry.hf_repo, f.path, revision=entry.revision, cache_dir=cache_dir,
                                local_files_only=True)
        except NotCachedError:
            results.append(VerifyResult(entry.name, f.path, "not-cached"))
            continue
        problem = file_problem(path, f.sha256, f.size)
        results.append(VerifyResult(entry.name, f.path, "ok" if problem is None else "mismatch", path,
                                    problem or ""))
    return results


def _weights_problem(folder: Path, label: str) -> str | None:
    """Why a folder's weights do not fit its ``config.json`` (or cannot be read in full), or None when they do."""
    import torch
    from safetensors import SafetensorError, safe_open

    from .config import ModelConfig
    from .folders import CONFIG_NAME, WEIGHTS_NAME, build

    cfg = ModelConfig.read(folder / CONFIG_NAME, label)
    try:  # safetensors checks the header and that the file holds every byte it declares
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        return f"not a complete safetensors file: {e}"
    if cfg.kind == "pretrain":  # building the model to compare needs the train extra; the file is complete
        return None if shapes else "holds no tensors"
    with torch.device("meta"):
        model = build(cfg, config_file=folder / CONFIG_NAME, label=label)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    bad = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    if missing or unexpected or bad:
        return (f"does not fit config.json: missing {missing[:4]}, unexpected {unexpected[:4]}, mis-shaped "
                f"{bad[:4]}")
    return None


def _verify_folder(src) -> list[VerifyResult]:
    from .config import ModelConfig
    from .folders import CONFIG_NAME, WEIGHTS_NAME

    folder, label = src.folder, src.label.split(" ")[0]
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / f).is_file()]
    if missing:
        return [VerifyResult(label, f, "mismatch", folder / f, f"missing from {folder}") for f in missing]
    try:
        problem = _weights_problem(folder, src.label)
    except Exception as e:  # noqa: BLE001 - whatever stops the config from building is a broken folder
        why = str(e) if isinstance(e, EcampError) else f"config.json does not build: {type(e).__name__}: {e}"
        return [VerifyResult(label, CONFIG_NAME, "mismatch", folder / CONFIG_NAME, why)]
    if problem:
        return [VerifyResult(label, WEIGHTS_NAME, "mismatch", folder / WEIGHTS_NAME, problem)]
    # a folder records no sha256 of its own: complete and consistent is what can be known
    what = "complete" if ModelConfig.read(folder / CONFIG_NAME).kind == "pretrain" else \
        "complete and consistent with config.json"
    return [VerifyResult(label, f, "no-hash", folder / f, f"{what}; a folder records no sha256")
            for f in (CONFIG_NAME, WEIGHTS_NAME)]


def _verify_hub(src, cache_dir: str | os.PathLike | None) -> list[VerifyResult]:
    name = src.label
    try:
        path = hub_download(src.repo, "model.safetensors", revision=src.revision, cache_dir=cache_dir,
                            local_files_only=True)
    except NotCachedError:
        return [VerifyResult(name, "model.safetensors", "not-cached")]
    try:
        checked = verify_lfs_blob(path)
    except ChecksumMismatchError as e:
        return [VerifyResult(name, "model.safetensors", "mismatch", path, str(e))]
    return [VerifyResult(name, "model.safetensors", "ok" if checked else "no-hash", path)]


def verify(name: str | None = None, *, cache_dir: str | os.PathLike | None = None,
           manifest: ManifestLike = None) -> list[VerifyResult]:
    """Check the files of one model (or of every manifest entry) offline.

    Published manifest entries: the cached files are re-hashed against the manifest's sha256 and size.
    ``hf-hub:`` names: against the Hub's LFS sha256 recorded in the cache. Folders (``local-dir:``, a path) and the
    local store of unpublished entries: every file present, the weights readable in full and fitting
    ``config.json`` (status ``no-hash``: a folder records no sha256). Nothing is downloaded: files that are not
    cached are reported as ``not-cached``.
    """
    from .factory import resolve

    if name is not None:
        src = resolve(name, manifest=manifest)
        if src.local:
            return _verify_folder(src)
        if src.kind == "hf-hub":
            return _verify_hub(src, cache_dir)
        return _verify_entry(src.entry, cache_dir)
    man = load_manifest(manifest)
    results: list[VerifyResult] = []
    for entry in man.models.values():
        src = resolve(entry.name, manifest=man)
        results.extend(_verify_folder(src) if src.local else _verify_entry(entry, cache_dir))
    if not results:
        raise ManifestError(f"Manifest {man.source} lists no models.", path=man.source)
    return results
