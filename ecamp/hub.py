"""Hub I/O: downloads through ``huggingface_hub``, sha256 verification, the local store.

Downloads go through :func:`huggingface_hub.hf_hub_download`, so its cache, ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_ENDPOINT`` (mirrors) and ``HF_HUB_OFFLINE`` all apply. The Hub client checks sizes only; ecamp hashes every file
against the manifest before anything is loaded.

The *local store* (``$ECAMP_HOME/local/<canonical name>/``, default ``~/.cache/ecamp``) holds weights that are not on
the Hub yet, e.g. converted from the authors' release; ``ecamp.load(name)`` looks there for unpublished entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import (
    ChecksumMismatchError,
    HubConnectionError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from .fileio import sha256_file
from .registry import ModelEntry

__all__ = [
    "ecamp_home",
    "local_store_path",
    "hub_download",
    "download_entry",
    "verify_entry",
    "file_problem",
    "verify_lfs_blob",
    "split_hub_spec",
]

logger = logging.getLogger("ecamp")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def ecamp_home() -> Path:
    """ecamp's own data folder: ``$ECAMP_HOME``, else ``$XDG_CACHE_HOME/ecamp``, else ``~/.cache/ecamp``."""
    if os.environ.get("ECAMP_HOME"):
        return Path(os.environ["ECAMP_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ecamp"


def local_store_path(name: str) -> Path:
    """Folder of the local store that ``ecamp.load(name)`` reads for an unpublished manifest entry."""
    return ecamp_home() / "local" / name


def split_hub_spec(spec: str) -> tuple[str, str | None]:
    """``"org/repo@rev"`` -> ``("org/repo", "rev")``; like timm's ``hf-hub:`` parsing."""
    repo, sep, rev = spec.partition("@")
    repo = repo.strip().strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise RepoNotFoundError(f"'hf-hub:{spec}' does not name a Hub repo; write 'hf-hub:org/name' or "
                                f"'hf-hub:org/name@revision'.")
    return repo, (rev or None) if sep else None


@contextlib.contextmanager
def _hub_errors(repo_id: str, filename: str, revision: str | None, fetch_hint: str) -> Iterator[None]:
    """Translate huggingface_hub's exceptions into ecamp's, naming the repo, file and next step."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    try:
        yield
    except hf_errors.HFValidationError as e:
        err = RepoNotFoundError(f"{repo_id!r} is not a valid Hub repo id ({e}); write 'org/name'.", repo_id=repo_id)
        raise err from e
    except hf_errors.LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "local_files_only=True was asked or the Hub could not be reached")
        raise NotCachedError(
            f"{filename} of {repo_id}@{rev} is not in the Hugging Face cache ({constants.HF_HUB_CACHE} unless "
            f"cache_dir/HF_HOME say otherwise) and {why}. Fetch it once while online: `{fetch_hint}` "
            f"(set HF_ENDPOINT to use a mirror).", repo_id=repo_id) from e
    except hf_errors.GatedRepoError as e:
        raise RepoNotFoundError(f"{repo_id} is gated: accept its terms on the Hub, then `hf auth login` "
                                f"(or set HF_TOKEN) and retry.", repo_id=repo_id) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise RepoNotFoundError(f"Hub repo {repo_id!r} does not exist at {_endpoint()} (or is private: log in "
                                f"with `hf auth login` or set HF_TOKEN). Check the name; `ecamp list` shows "
                                f"the known models.", repo_id=repo_id) from e
    except hf_errors.RevisionNotFoundError as e:
        raise RevisionNotFoundError(f"Hub repo {repo_id!r} has no revision {rev!r} (branch, tag or commit). "
                                    f"Omit revision= to use the pinned/default one.", repo_id=repo_id) from e
    except hf_errors.EntryNotFoundError as e:
        raise RemoteFileNotFoundError(f"Hub repo {repo_id!r} at revision {rev!r} has no file {filename!r}; it "
                                      f"is not a timm-format ecamp repo (config.json + model.safetensors).",
                                      repo_id=repo_id) from e
    except hf_errors.OfflineModeIsEnabled as e:
        raise NotCachedError(f"{repo_id}@{rev} needs the Hub but HF_HUB_OFFLINE is set. Fetch it once while "
                             f"online: `{fetch_hint}`.", repo_id=repo_id) from e
    except hf_errors.HfHubHTTPError as e:
        raise HubConnectionError(f"The Hub at {_endpoint()} failed on {filename} of {repo_id}@{rev}: {e}. "
                                 f"Retry, or set HF_ENDPOINT to a mirror.", repo_id=repo_id) from e


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_download(repo_id: str, filename: str, *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                 force_download: bool = False, fetch_hint: str | None = None) -> Path:
    """Download (or find in the cache) one file of a Hub repo, with ecamp's errors."""
    from huggingface_hub import hf_hub_download

    from .version import __version__

    hint = fetch_hint or f"ecamp download hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    with _hub_errors(repo_id, filename, revision, hint):
        path = hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            force_download=force_download, library_name="ecamp", library_version=__version__,
        )
    return Path(path)


def download_entry(entry: ModelEntry, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool = False, force_download: bool = False,
                   files: Sequence[str] | None = None, verify: bool = True) -> dict[str, Path]:
    """Fetch the files of a published manifest entry and check their sha256; returns ``{path: local path}``."""
    pinned = entry.revision
    rev = revision or pinned
    wanted = list(files) if files is not None else [f.path for f in entry.files]
    hint = f"ecamp download {entry.aliases[0] if entry.aliases else entry.name}"
    paths = {name: hub_download(entry.hf_repo, name, revision=rev, cache_dir=cache_dir,
                                local_files_only=local_files_only, force_download=force_download, fetch_hint=hint)
             for name in wanted}
    if verify:
        if rev == pinned:
            verify_entry(entry, paths)
        else:
            logger.warning("%s: revision %s differs from the pinned %s, so the manifest's sha256 values do not "
                           "apply; checking LFS files against the Hub's own sha256 instead.", entry.name, rev, pinned)
            for p in paths.values():
                verify_lfs_blob(p)
    return paths


def verify_entry(entry: ModelEntry, paths: dict[str, Path]) -> None:
    """Raise :class:`ChecksumMismatchError` unless every file matches the manifest's size and sha256."""
    expected = {f.path: (f.sha256, f.size) for f in entry.files}
    _verify_files(paths, expected, refetch=f"ecamp download {entry.aliases[0] if entry.aliases else entry.name} "
                                          f"--force")


def file_problem(path: str | os.PathLike, sha256: str | None, size: int | None) -> str | None:
    """Why ``path`` does not match the expected size and sha256, or None when it does (the one hash check)."""
    if sha256 is None:
        return "no sha256 is recorded for it"
    actual_size = os.path.getsize(path)
    if size is not None and actual_size != size:
        return f"size {actual_size} (expected {size})"
    actual = sha256_file(path)
    return None if actual == sha256 else f"sha256 {actual}, expected {sha256}"


def _verify_files(paths: dict[str, Path], expected: dict[str, tuple[str | None, int | None]], refetch: str) -> None:
    for name, path in paths.items():
        sha, size = expected[name]
        problem = file_problem(path, sha, size)
        if problem is None:
            continue
        if sha is None:
            raise ChecksumMismatchError(f"No sha256 is recorded for {name}; refusing to load unverified weights.",
                                        path=path)
        raise ChecksumMismatchError(
            f"{path} ({name}) is corrupt or was tampered with: {problem}, expected sha256 {sha}. It was not "
            f"loaded. Re-fetch it with `{refetch}`, or delete it from the cache and retry.", path=path)


def verify_lfs_blob(path: Path) -> bool:
    """Check a cached Hub file against its LFS sha256 (the blob's name in the cache); False if it has none."""
    real = Path(os.path.realpath(path))
    if real.parent.name != "blobs" or not _SHA256_RE.match(real.name):
        return False
    actual = sha256_file(real)
    if actual != real.name:
        raise ChecksumMismatchError(f"{path} is corrupt or was tampered with: sha256 {actual}, but the Hub's LFS "
                                    f"sha256 is {real.name}. Re-fetch it with force_download=True (CLI: --force).",
                                    path=path)
    return True
