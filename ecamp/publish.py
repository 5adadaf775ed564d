"""Publish an ecamp model folder (any kind: encoder, classifier, segmentation, detection, pre-training) to the Hub
and record it as a pinned manifest entry.

:func:`push` checks the folder and hashes every file locally before any request, then creates the repo and uploads
the folder with ``huggingface_hub`` (so its token lookup, ``HF_ENDPOINT`` and Xet or LFS transfers all apply),
checks that the new commit holds exactly the hashed files, and only then writes the entry (the commit as
``revision``, ``files`` with sha256 and size, ``published: true``) into a manifest file. A push that fails or is
interrupted leaves that file as it was, so ``ecamp.load(name, manifest=...)`` only ever sees verified commits.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import (
    ChecksumMismatchError,
    EcampError,
    HubConnectionError,
    HubPermissionError,
    InvalidArgumentError,
    ManifestError,
    ModelFolderError,
    RepoNotFoundError,
    RestrictedDataError,
    RevisionNotFoundError,
)
from .fileio import atomic_write, sha256_file
from .registry import ENCODER_FILES, SCHEMA_VERSION, parse_manifest

__all__ = ["push", "GATED_MODES"]

logger = logging.getLogger("ecamp")

PathLike = str | os.PathLike
# Names that editors, downloads and atomic writers leave behind while a file is being written
_TEMPORARY = re.compile(r"(^\.|~$|\.(tmp|temp|part|partial|incomplete|lock|swp)$|\.tmp-)", re.IGNORECASE)
_PLACEHOLDER_COMMIT = "0" * 40
# The Hub's access-request modes (``HfApi.update_repo_settings(gated=...)``): requests approved at once, or by hand
GATED_MODES = ("auto", "manual")


def _folder_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (posix paths, sorted); refuses symlinks and temporary files."""
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder; push the folder ecamp.save_pretrained (or `ecamp train "
                               f"export`, `ecamp convert --out`) wrote.", path=folder)
    found = []
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs) + sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise ModelFolderError(f"{path} is a symbolic link; the Hub stores files, not links. Replace it with "
                                       f"the file it points to, or remove it, then push again.", path=path)
            if _TEMPORARY.search(name):
                raise ModelFolderError(f"{path} is a hidden or temporary file ({rel}); a model folder is published "
                                       f"whole, so remove it (or wait for the write that left it to finish) and "
                                       f"push again.", path=path)
            if path.is_file():
                found.append(rel)
            elif not path.is_dir():
                raise ModelFolderError(f"{path} is not a regular file; remove it and push again.", path=path)
    missing = [f for f in ENCODER_FILES if f not in found]
    if missing:
        raise ModelFolderError(f"{folder} lacks {', '.join(missing)}: it is not an ecamp model folder "
                               f"(config.json + model.safetensors, as ecamp.save_pretrained writes).", path=folder)
    return sorted(found)


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _default_name(repo_id: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", repo_id.split("/")[-1].lower()).strip("-._") or "model"


def _merged(manifest: Path | None, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest data with ``entry`` under ``name`` (added or replaced), validated by registry's schema."""
    data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "models": {}}
    if manifest is not None and manifest.exists():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"--manifest-out {manifest} is not a readable JSON manifest ({e}); fix or move it, "
                                f"or name a new file.", path=manifest) from e
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ManifestError(f"--manifest-out {manifest} is not a weights manifest (no 'models' object); name a "
                                f"new file or a manifest.", path=manifest)
    data["models"] = {**data["models"], name: entry}
    parse_manifest(data, source=str(manifest) if manifest is not None else "<push>")
    return data


def _transport_errors() -> tuple[type[BaseException], ...]:
    """OSError and the base error of the HTTP library under huggingface_hub (httpx's is not an OSError)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, *(c for c in HfHubHTTPError.__mro__[1:] if issubclass(c, Exception)
                       and c not in (OSError, Exception)))


@contextlib.contextmanager
def _push_errors(folder: Path, repo_id: str, revision: str) -> Iterator[None]:
    """huggingface_hub's exceptions as ecamp's, naming the repo and the next step; nothing is recorded on any."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision} at {constants.ENDPOINT}"
    login = "log in with `hf auth login`, set HF_TOKEN or pass --token, with a token that can write to it"
    try:
        yield
    except EcampError:
        raise
    except hf_errors.RepositoryNotFoundError as e:
        raise RepoNotFoundError(f"Hub repo {where} was not found, or your token cannot see it: {login}. Nothing "
                                f"was recorded.", repo_id=repo_id) from e
    except hf_errors.RevisionNotFoundError as e:
        raise RevisionNotFoundError(f"Hub repo {repo_id} has no branch {revision!r} to commit to; pass an existing "
                                    f"branch as --revision. Nothing was recorded.", repo_id=repo_id) from e
    except hf_errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise HubPermissionError(f"The Hub refused to write {folder} to {where} ({status}): {login}. Nothing "
                                     f"was recorded.", repo_id=repo_id) from e
        raise HubConnectionError(f"The Hub failed while pushing {folder} to {where}: {e}. Nothing was recorded; "
                                 f"push again (files it already holds are not sent twice).", repo_id=repo_id) from e
    except (ValueError, RuntimeError, *_transport_errors()) as e:  # rejected card metadata, failed uploads, network
        raise HubConnectionError(f"Pushing {folder} to {where} failed: {e}. Nothing was recorded; fix what it says "
                                 f"and push again.", repo_id=repo_id) from e


def _check_commit(api, repo_id: str, commit: str, files: list[dict[str, Any]], folder: Path) -> None:
    """Refuse a commit whose files are not the ones hashed (a file changed during the upload, or the Hub skipped
    one): the manifest entry must verify when ``ecamp.load`` downloads it."""
    info = api.model_info(repo_id, revision=commit, files_metadata=True)
    remote = {s.rfilename: s for s in info.siblings or []}
    for f in files:
        sibling = remote.get(f["path"])
        if sibling is None:
            problem = "is missing from it"
        elif sibling.lfs is not None:
            problem = None if (sibling.lfs.sha256, sibling.lfs.size) == (f["sha256"], f["size"]) else \
                f"has sha256 {sibling.lfs.sha256} ({sibling.lfs.size} bytes)"
        else:
            problem = None if sibling.blob_id == _git_blob_sha1(folder / f["path"]) else \
                f"has git blob {sibling.blob_id}"
        if problem:
            raise ChecksumMismatchError(
                f"Commit {commit} of {repo_id}: {f['path']} {problem}, but the file hashed in {folder} has sha256 "
                f"{f['sha256']} ({f['size']} bytes). Did it change during the upload? Nothing was recorded; push "
                f"again once the folder is final.", path=folder / f["path"], repo_id=repo_id)


def _restricted(config, paths: list[str], folder: Path, *, private: bool, gated: str | None) -> bool:
    """Whether the folder holds credentialed report text; refuses a public, ungated push of it."""
    from .cards import credentialed_text

    reports = credentialed_text(config, paths)
    if reports is None:
        return False
    if not private and gated is None:
        what = "the full pre-training model (its report encoder" + (" and tokenizer)" if "tokenizer.json" in paths
                                                                   else ")") \
            if config.kind == "pretrain" else "a tokenizer"
        raise RestrictedDataError(
            f"{folder} holds {what}, trained on {reports[0]}, which are under the {reports[1]} ({reports[2]}): "
            f"they may be shared only with people who have signed it, so a public push is refused. Push with "
            f"--gated manual (you approve each access request; --gated auto approves them at once) or --private, "
            f"or publish the image encoder alone (`ecamp train export` writes it beside this folder). Nothing was "
            f"sent.", path=folder)
    return True


def _with_notice(folder: Path, config, paths: list[str]) -> list[str]:
    """A folder whose licence is "other" gets the ``NOTICE`` its card's ``license_link`` names, if it lacks one."""
    from .cards import NOTICE_NAME, notice_text

    if NOTICE_NAME in paths or "LICENSE" in paths:
        return paths
    text = notice_text(config)
    if text is None:
        return paths
    atomic_write(folder / NOTICE_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.info("Wrote %s: the terms the model card's license_link names.", folder / NOTICE_NAME)
    return sorted([*paths, NOTICE_NAME])


def push(folder: PathLike, repo_id: str, *, name: str | None = None, private: bool = False, revision: str = "main",
         token: str | None = None, commit_message: str | None = None, manifest: PathLike | None = None,
         create: bool = True, gated: str | None = None) -> dict[str, Any]:
    """Upload the ecamp folder ``folder`` to Hub repo ``repo_id`` and return its pinned manifest entry.

    Args:
        folder: an ecamp model folder (``config.json``, ``model.safetensors``, usually ``README.md``; any head
            or extra files go along). Symlinks and temporary files are refused.
        repo_id: ``org/name``; created (``private`` or public) unless it exists or ``create=False``.
        name: the entry's manifest name (default: the folder's own, else the repo's name).
        revision: the branch to commit to (created from the default branch when missing).
        token: a Hub token with write access; default: ``HF_TOKEN`` or the ``hf auth login`` cache.
        commit_message: default ``"Upload <name> with ecamp <version>"``.
        manifest: a manifest file to add the entry to (created if missing, replaced atomically), after which
            ``ecamp.load(name, manifest=manifest)`` loads the pushed commit, verified.
        gated: ``"auto"`` or ``"manual"``: the repo asks users to request access (``HfApi.update_repo_settings``),
            set before any file is uploaded.

    A folder holding a text side trained on credentialed reports (the full pre-training model, a tokenizer) is
    refused for a public push (:class:`RestrictedDataError`, naming the licence) unless ``gated`` or
    ``private``. A folder whose licence is ``"other"`` gets a ``NOTICE`` file (the terms its model card's
    ``license_link`` names) before it is hashed, if it has none.

    Returns ``{"name", "repo_id", "revision", "commit_url", "entry", "manifest"}``; ``entry`` is the manifest entry
    (``docs/manifest.md``) with ``revision`` the new commit and the sha256 and size of every file.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .cards import manifest_entry
    from .config import ModelConfig
    from .factory import LOCAL_DIR_PREFIX, load, load_pretrain
    from .version import __version__

    folder = Path(folder).expanduser()
    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("no organisation or user")
    except HFValidationError as e:
        raise InvalidArgumentError(f"--repo {repo_id!r} is not a Hub repo id ({e}); write 'org/name'.",
                                   repo_id=repo_id) from e
    out = Path(manifest).expanduser() if manifest is not None else None
    if out is not None:  # a folder, a missing or read-only place: refused before anything is uploaded
        from .outputs import check_output

        check_output(out, option="--manifest-out")
    # everything about the folder is checked before the first request: layout, that ecamp loads it, the entry
    if gated is not None and gated not in GATED_MODES:
        raise InvalidArgumentError(f"--gated {gated!r}: use one of {', '.join(GATED_MODES)}.", repo_id=repo_id)
    paths = _folder_files(folder)
    config = ModelConfig.read(folder / "config.json")
    restricted = _restricted(config, paths, folder, private=private, gated=gated)
    (load_pretrain if config.kind == "pretrain" else load)(LOCAL_DIR_PREFIX + str(folder))
    known = out if out is not None and out.exists() else None
    name = name or manifest_entry(config, manifest=known)[0] or _default_name(repo_id)
    paths = _with_notice(folder, config, paths)
    stats = {p: (folder / p).stat() for p in paths}
    files = [{"path": p, "sha256": sha256_file(folder / p), "size": stats[p].st_size} for p in paths]
    name, entry = manifest_entry(config, name=name, hf_repo=repo_id, files=files, revision=_PLACEHOLDER_COMMIT,
                                 manifest=known)
    if not entry["provenance"]:
        raise ModelFolderError(f"{folder}/config.json names no ECAMP modality (its 'ecamp' block lacks 'modality'), "
                               f"so it is not an ecamp folder; write it with ecamp.save_pretrained from a model "
                               f"ecamp.load or ecamp.load_pretrain built.", path=folder / "config.json")
    _merged(out, name, entry)  # schema, name and alias clashes: refused here, before anything is uploaded
    card = folder / "README.md"
    if not card.is_file() or f"hf-hub:{repo_id}" not in card.read_text(encoding="utf-8", errors="replace"):
        logger.warning("%s does not name hf-hub:%s; write the folder with hf_repo=%r (`ecamp train export "
                       "--hf-repo`) for a model card that does.", card, repo_id, repo_id)

    api = HfApi(token=token, library_name="ecamp", library_version=__version__)
    with _push_errors(folder, repo_id, revision):
        if create:
            api.create_repo(repo_id, private=private, exist_ok=True)
        # access rules before the first file: a gated or private repo never shows its files openly
        if gated is not None or (restricted and private):
            api.update_repo_settings(repo_id, gated=gated, private=True if private else None)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 allow_patterns=[glob.escape(p) for p in paths],
                                 commit_message=commit_message or f"Upload {name} with ecamp {__version__}")
        changed = [p for p in paths if (st := (folder / p).stat()).st_size != stats[p].st_size
                   or st.st_mtime_ns != stats[p].st_mtime_ns]
        if changed:
            raise ChecksumMismatchError(f"{', '.join(changed)} in {folder} changed during the push, so commit "
                                        f"{info.oid} may not hold what was hashed. Nothing was recorded; push "
                                        f"again once the folder is final.", path=folder / changed[0],
                                        repo_id=repo_id)
        _check_commit(api, repo_id, info.oid, files, folder)
    entry["revision"] = info.oid
    if out is not None:
        try:
            data = _merged(out, name, entry)
            atomic_write(out, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
        except (OSError, ManifestError) as e:  # the commit exists: say which, and how to record it
            raise ManifestError(f"Pushed {folder} to {repo_id} as commit {info.oid}, but --manifest-out {out} could "
                                f"not be written ({str(e)[:200]}); record it by running the same push with a "
                                f"writable --manifest-out (unchanged files make no new commit), or pin revision "
                                f"{info.oid} by hand.", path=out, repo_id=repo_id) from e
    else:
        parse_manifest({"schema_version": SCHEMA_VERSION, "models": {name: entry}}, source="<push>")
    logger.info("Pushed %s to %s@%s (%s)", folder, repo_id, info.oid, info.commit_url)
    return {"name": name, "repo_id": repo_id, "revision": info.oid, "commit_url": str(info.commit_url),
            "entry": entry, "manifest": str(out) if out is not None else None, "gated": gated or False,
            "private": private}
