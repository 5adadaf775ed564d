"""Re-hash cached weights against the manifest (``ecamp verify``), without touching the network."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumMismatchError, ManifestError, NotCachedError
from .hub import file_problem, hub_download, split_hub_spec, verify_lfs_blob
from .registry import HF_HUB_PREFIX, ManifestLike, ModelEntry, load_manifest

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


def verify(name: str | None = None, *, cache_dir: str | os.PathLike | None = None,
           manifest: ManifestLike = None) -> list[VerifyResult]:
    """Re-hash the cached files of one model (or of every published manifest entry) offline.

    ``hf-hub:`` names are checked against the Hub's LFS sha256 recorded in the cache. Nothing is downloaded:
    files that are not cached are reported as ``not-cached``.
    """
    if name is not None and name.startswith(HF_HUB_PREFIX):
        repo, rev = split_hub_spec(name[len(HF_HUB_PREFIX):])
        try:
            path = hub_download(repo, "model.safetensors", revision=rev, cache_dir=cache_dir, local_files_only=True)
        except NotCachedError:
            return [VerifyResult(name, "model.safetensors", "not-cached")]
        try:
            checked = verify_lfs_blob(path)
        except ChecksumMismatchError as e:
            return [VerifyResult(name, "model.safetensors", "mismatch", path, str(e))]
        return [VerifyResult(name, "model.safetensors", "ok" if checked else "no-hash", path)]
    man = load_manifest(manifest)
    if name is not None:
        return _verify_entry(man.resolve(name), cache_dir)
    results: list[VerifyResult] = []
    for entry in man.models.values():
        results.extend(_verify_entry(entry, cache_dir))
    if not results:
        raise ManifestError(f"Manifest {man.source} lists no models.", path=man.source)
    return results
