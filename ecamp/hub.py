"""Hub I/O: downloads through ``huggingface_hub``, sha256 verification, the local store.

Downloads go through :func:`huggingface_hub.hf_hub_download`, so its cache, ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_ENDPOINT`` (mirrors) and ``HF_HUB_OFFLINE`` all apply. The Hub client checks sizes only; ecamp hashes every file
against the manifest before anything is loaded.

The *local store* (``$ECAMP_HOME/local/<canonical name>/``, default ``~/.cache/ecamp``) holds weights that are not on
the Hub yet, e.g. converted from the authors' release; ``ecamp.load(name)`` looks there for unpublished entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    ChecksumMismatchError,
    HubConnectionError,
    InvalidArgumentError,
    ManifestError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnknownModelError,
)
from .fileio import sha256_file
from .registry import ECAMP_BLOCK_FIELDS, PRETRAINED_CFG_FIELDS, ManifestLike, ModelEntry, load_manifest

__all__ = [
    "ecamp_home",
    "local_store_path",
    "sha256_file",
    "hub_download",
    "download_entry",
    "verify_entry",
    "verify_files",
    "file_problem",
    "verify_lfs_blob",
    "split_hub_spec",
    "save_pretrained",
    "manifest_entry",
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
    verify_files(paths, expected, refetch=f"ecamp download {entry.aliases[0] if entry.aliases else entry.name} "
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


def verify_files(paths: dict[str, Path], expected: dict[str, tuple[str | None, int | None]], refetch: str) -> None:
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


# --------------------------------------------------------------------------------------------------------------------
# Manifest entries and model cards of timm-format folders, both built from the manifest entry a folder comes from

# Tags the Hub filters on, and the data sets ECAMP pre-trains on, per modality
_CARD_TAGS = {"cxr": ["chest-x-ray", "radiology"], "fundus": ["fundus", "ophthalmology"]}
_CARD_DATASETS = {"cxr": ["mimic-cxr"], "fundus": ["ffa-ir"]}
# What a folder's weights are to the manifest entry it names: that entry's own weights ("is"); fine-tuned or
# otherwise changed from them ("derives"); trained anew by `ecamp train` with its recipe ("recipe"); or only an
# encoder of the same modality ("family").


@dataclass(frozen=True)
class _Origin:
    entry: ModelEntry | None  # the manifest entry the folder is or comes from; None outside the ECAMP family
    relation: str
    name: str | None  # the folder's own manifest name, when it can have one


def _find_entry(name: object, manifests: Sequence[ManifestLike]) -> ModelEntry | None:
    """The image-encoder entry ``name`` resolves to in the first of ``manifests`` that knows it."""
    if not isinstance(name, str) or not name:
        return None
    for manifest in manifests:
        try:
            entry = load_manifest(manifest).resolve(name)
        except UnknownModelError:
            continue
        except ManifestError as e:  # a card or entry says less, but saving weights does not fail over it
            logger.warning("Not reading %s (the model card and manifest entry say less): %s",
                           manifest or "the manifest", e)
            continue
        if entry.kind == "encoder":
            return entry
    return None


def _modality_entry(modality: object, manifests: Sequence[ManifestLike]) -> ModelEntry | None:
    for manifest in manifests:
        with contextlib.suppress(ManifestError):
            for entry in load_manifest(manifest).models.values():
                if entry.kind == "encoder" and entry.ecamp.get("modality") == modality:
                    return entry
    return None


def _origin(config: Mapping[str, Any], manifest: ManifestLike = None) -> _Origin:
    """Which manifest entry the folder of ``config`` is, or comes from (``manifest`` first, then the default)."""
    block = config.get("ecamp") or {}
    manifests = [manifest, None] if manifest is not None else [None]
    parent = _find_entry(block.get("derived_from"), manifests)
    named = _find_entry(block.get("name"), manifests)
    own_name = None if named is not None else block.get("name")
    if parent is not None:
        return _Origin(parent, "derives", own_name)
    if named is not None:
        same_head = (named.pretrained_cfg.get("num_classes") or 0) == (config.get("num_classes") or 0)
        trained = "checkpoint" in (block.get("provenance") or {})  # what `ecamp train export` records
        if same_head:
            return _Origin(named, "recipe", None) if trained else _Origin(named, "is", named.name)
        return _Origin(named, "derives", None)
    return _Origin(_modality_entry(block.get("modality"), manifests), "family", own_name)


def _plain(value: Any) -> Any:
    """A JSON-ready deep copy of a manifest value (mappings and tuples of the parsed entry)."""
    return json.loads(json.dumps(value))


def _entry(config: Mapping[str, Any], origin: _Origin, *, name: str | None, hf_repo: str | None,
           files: Sequence[Mapping[str, Any]] = (), revision: str | None = None) -> dict[str, Any]:
    """The manifest entry (docs/manifest.md) of a folder: what the folder holds, plus what ``origin`` records."""
    block = config.get("ecamp") or {}
    n = config.get("num_classes") or 0
    pcfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items()
            if k in PRETRAINED_CFG_FIELDS and v is not None}
    pcfg["num_classes"] = n
    if hf_repo:
        pcfg["hf_hub_id"] = hf_repo
    what = f"A {n}-class classifier" if n else "An image encoder"
    base = origin.entry
    entry: dict[str, Any] = {
        "aliases": [], "kind": "encoder",
        "description": block.get("description") or f"{what} ({config['architecture']}) in timm format, exported by "
                                                    f"ecamp.",
        "architecture": config["architecture"], "model_args": _plain(config.get("model_args") or {}),
        "hf_repo": hf_repo, "revision": revision, "published": revision is not None,
        "files": [dict(f) for f in files], "pretrained_cfg": _plain(pcfg),
        "ecamp": {k: v for k, v in block.items() if k in ECAMP_BLOCK_FIELDS},
        "license": pcfg.get("license") or "other", "license_note": "", "provenance": {}, "training": {},
        "metrics": [],
    }
    if base is None:
        return entry
    prov = dict(base.provenance)
    derived_prov = {"paper": prov["paper"], "original_file": None, "original_url": None,
                    "conversion": "Saved by ecamp.save_pretrained as timm-format config.json and safetensors.",
                    **({"code": prov["code"]} if prov.get("code") else {})}
    entry.update(license=base.license, license_note=base.license_note)
    if origin.relation == "is":
        entry.update(aliases=list(base.aliases) if name == base.name else [], description=base.description,
                     provenance=prov, training=dict(base.training), metrics=list(base.metrics))
    elif origin.relation == "derives":
        entry.update(description=block.get("description") or f"{what} derived from {base.name} "
                                                              f"({base.description.rstrip('.')}).",
                     provenance={**derived_prov, "notes": f"Derived from {base.name} ({base.hf_repo})."},
                     training={"recipe": None, "data": base.training.get("data", ""),
                               "notes": f"The data {base.name} was pre-trained on; later training is not recorded."})
    elif origin.relation == "recipe":
        checkpoint = Path(str(block["provenance"]["checkpoint"])).name
        entry.update(description=block.get("description") or f"{base.description.rstrip('.')}, trained anew with "
                                                              f"its recipe.",
                     provenance={**derived_prov, "conversion": f"Exported by `ecamp train export` from {checkpoint}."},
                     training=dict(base.training))
    else:
        modality = base.ecamp.get("modality")
        entry.update(description=block.get("description") or f"{what} of the ECAMP family (modality {modality}); "
                                                              f"the manifest records no weights it derives from.",
                     provenance={**derived_prov, "notes": "No base weights are recorded for it."},
                     training={"recipe": None, "data": "not recorded"})
    return _plain(entry)


def manifest_entry(config: Mapping[str, Any], *, name: str | None = None, hf_repo: str | None = None,
                   files: Sequence[Mapping[str, Any]] = (), revision: str | None = None,
                   manifest: ManifestLike = None) -> tuple[str | None, dict[str, Any]]:
    """The manifest name and entry of a folder whose ``config.json`` is ``config``; ``revision`` marks it published.

    Fields the folder cannot tell (licence, provenance, training, metrics) come from the manifest entry the folder
    names in ``config["ecamp"]`` (``name``, ``derived_from``; looked up in ``manifest``, then ``$ECAMP_MANIFEST`` or
    the packaged one); weights that differ from that entry's get no aliases and no metrics. ``name`` defaults to the
    folder's own manifest name (None when it has none).
    """
    origin = _origin(config, manifest)
    name = name or origin.name
    return name, _entry(config, origin, name=name, hf_repo=hf_repo, files=files, revision=revision)


def _bibtex(paper: Mapping[str, Any]) -> str:
    key = re.sub(r"[^a-z0-9]", "", paper["title"].split()[0].lower()) + str(paper.get("year") or "")
    fields = [("title", paper["title"]), ("journal", paper.get("venue")), ("year", paper.get("year")),
              ("doi", paper.get("doi")), ("eprint", paper.get("arxiv")),
              ("archiveprefix", "arXiv" if paper.get("arxiv") else None)]
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields if v)
    return f"@{'article' if paper.get('venue') else 'misc'}{{{key},\n{body}\n}}"


def _model_card(config: Mapping[str, Any], origin: _Origin, entry: Mapping[str, Any], *, name: str | None,
                hf_repo: str | None):
    """The ``huggingface_hub.ModelCard`` of a folder: metadata for the Hub, then use, preprocessing, training data,
    results, provenance, licence and citation, all from ``entry``."""
    from huggingface_hub import ModelCard, ModelCardData

    block = config.get("ecamp") or {}
    pcfg = config["pretrained_cfg"]
    modality = block.get("modality")
    n = config.get("num_classes") or 0
    task = "image-classification" if n else "image-feature-extraction"
    base = origin.entry
    lic = entry["license"]
    data = ModelCardData(
        library_name="timm", license=lic, license_name="see-model-card" if lic == "other" else None,
        pipeline_tag=task, tags=["timm", task, "ecamp", "medical", *_CARD_TAGS.get(modality, [])],
        datasets=_CARD_DATASETS.get(modality) if base is not None and origin.relation != "family" else None,
        # the Hub refuses a base_model that is not an existing repo, so only a published base is named
        base_model=base.hf_repo if base is not None and origin.relation == "derives" and base.published else None,
        metrics=sorted({m["metric"] for m in entry["metrics"]}) or None,
    )
    repo = hf_repo or "<org>/<repo>"
    out = "logits" if n else "embedding"
    lines = [
        f"# {name or hf_repo or config['architecture']}", "", entry["description"], "",
        "Research use only; not a medical device and not validated for clinical decisions.", "",
        "## Use", "", "```python", "import ecamp", "",
        f'model = ecamp.load("hf-hub:{repo}")', "tf = ecamp.get_transform(model)",
        f'{out} = model(tf("image.png")[None])  # [1, {n or config.get("num_features", 768)}]', "```", "",
        f'Without ecamp: `timm.create_model("hf-hub:{repo}", pretrained=True)` builds the same model.', "",
    ]
    if config.get("label_names"):
        lines += [f"Classes, in output order: {', '.join(config['label_names'])}.", ""]
    lines += [
        "## Preprocessing", "",
        f"- input size {pcfg['input_size']}, interpolation {pcfg.get('interpolation')}, "
        f"crop_pct {pcfg.get('crop_pct')} ({pcfg.get('crop_mode', 'center')} crop)",
        f"- mean {pcfg['mean']}, std {pcfg['std']}",
        f"- modality: {modality or 'not recorded'}; image policy: {block.get('image_policy', 'not recorded')}"
        + ("; grey converted to 3 channels" if block.get("grayscale") else ""), "",
    ]
    training = entry["training"]
    if training:
        lines += ["## Training data", "", f"- {training['data']}"]
        if training.get("recipe"):
            lines.append(f"- recipe: `ecamp train pretrain --config {training['recipe'].split('/')[-1]}`")
        if training.get("notes"):
            lines.append(f"- {training['notes']}")
        lines.append("")
    if entry["metrics"]:
        lines += ["## Results", "", "| task | metric | value | split | source |", "|---|---|---|---|---|"]
        lines += [f"| {m['task']} | {m['metric']} | {m['value']} | {m.get('split', '')} | {m['source']} |"
                  for m in entry["metrics"]]
        lines.append("")
    prov = entry["provenance"]
    paper = prov.get("paper") or {}
    if prov:
        lines += ["## Provenance", ""]
        if paper:
            lines.append(f"- paper: {paper['title']} (doi:{paper['doi']})")
        for key in ("original_file", "original_url", "conversion", "code", "code_commit", "notes"):
            if prov.get(key):
                lines.append(f"- {key.replace('_', ' ')}: {prov[key]}")
        lines.append("")
    if entry["license_note"]:
        lines += ["## Licence", "", entry["license_note"], ""]
    if paper:
        lines += ["## Citation", "", "```bibtex", _bibtex(paper), "```", ""]
    order = ["library_name", "license", "license_name", "pipeline_tag", "tags", "datasets", "base_model", "metrics"]
    return ModelCard(f"---\n{data.to_yaml(original_order=order)}\n---\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------------------------
# save_pretrained: the timm-format folder (config.json + model.safetensors + README.md)


def _model_args_for_export(model, extra: dict | None) -> dict:
    """Arguments that rebuild ``model`` with ``timm.create_model(architecture, **args)``."""
    from torch import nn

    args = {k: v for k, v in dict(getattr(model, "_model_args", None) or {}).items()
            if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "device", "dtype", "pretrained_model_args",
                         "cache_dir") and not k.endswith("drop_rate")}
    if hasattr(model, "global_pool") and isinstance(model.global_pool, str):
        args["global_pool"] = model.global_pool
    if hasattr(model, "fc_norm"):
        args["fc_norm"] = not isinstance(model.fc_norm, nn.Identity)
    args.update(extra or {})
    args.pop("num_classes", None)  # set by timm from the model itself
    return args


def _check_rebuild(model, architecture: str, args: dict) -> None:
    """Refuse to write a folder whose config would not rebuild the model (timm would fail to load it)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            probe = timm.create_model(architecture, pretrained=False, num_classes=model.num_classes, **args)
    except Exception as e:  # noqa: BLE001 - any build failure means the config is unusable
        raise InvalidArgumentError(f"timm cannot rebuild {architecture} from model_args {args}: {e}. Pass "
                                   f"model_args= to save_pretrained.") from e
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise InvalidArgumentError(f"timm.create_model({architecture!r}, **{args}) does not rebuild this model "
                                   f"(differs in {diff[:5]}); pass the constructor arguments as model_args= to "
                                   f"save_pretrained.")


def save_pretrained(model, out_dir: str | os.PathLike, *, name: str | None = None, hf_repo: str | None = None,
                    ecamp_cfg: dict | None = None, model_args: dict | None = None,
                    label_names: Sequence[str] | None = None) -> dict:
    """Write ``model`` as a timm-format folder and return its manifest entry (:func:`manifest_entry`, with the
    files' sha256 and size, and its ``name``).

    ``label_names`` (one per output of a classifier; default: the model's ``pretrained_cfg["label_names"]``) go into
    ``config.json`` as timm and transformers read them (``id2label`` of ``AutoModelForImageClassification``).

    The folder holds ``config.json`` (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
    ``model_args``, ``pretrained_cfg`` and an ``ecamp`` block), ``model.safetensors`` and a model card
    ``README.md``; ``timm.create_model("hf-hub:<repo>", pretrained=True)`` and ``ecamp.load`` both read it. Each
    file is written to a temporary name and renamed, so a crash never leaves a half-written file. A new ``name``
    for a model that came from another manifest entry records that entry as ``ecamp.derived_from``.
    """
    import shutil
    import tempfile

    from timm.models import save_for_hf

    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = pcfg.get("architecture")
    if not architecture:
        raise InvalidArgumentError(f"{type(model).__name__} has no pretrained_cfg['architecture']; save_pretrained "
                                   f"writes timm models built by ecamp.load or timm.create_model.")
    args = _model_args_for_export(model, model_args)
    labels = list(label_names if label_names is not None else pcfg.get("label_names") or [])
    if labels and len(labels) != getattr(model, "num_classes", len(labels)):
        raise InvalidArgumentError(f"{len(labels)} label names for a model with {model.num_classes} outputs; give "
                                   f"one name per class.")
    _check_rebuild(model, architecture, args)
    block = {k: v for k, v in dict(getattr(model, "ecamp_cfg", None) or {}).items() if k != "source"}
    block.update(ecamp_cfg or {})
    if name:
        previous = block.get("name")
        if previous and previous != name and "derived_from" not in block:
            was, now = _find_entry(previous, [None]), _find_entry(name, [None])
            if was is None or now is None or was.name != now.name:
                block["derived_from"] = previous
        block["name"] = name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_config: dict = {"ecamp": block}
        if labels:
            model_config["label_names"] = labels
        save_for_hf(model, str(tmp), model_config=model_config, model_args=args, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        # num_classes stays at the config's root only: transformers' TimmWrapper passes model_args and
        # num_classes to timm.create_model side by side, so a copy in model_args breaks AutoModel
        config.get("model_args", {}).pop("num_classes", None)
        if hf_repo:
            config["pretrained_cfg"]["hf_hub_id"] = hf_repo
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        origin = _origin(config)
        entry = _entry(config, origin, name=origin.name, hf_repo=hf_repo)
        _model_card(config, origin, entry, name=name or block.get("name"), hf_repo=hf_repo).save(tmp / "README.md")
        files = []
        for fname in ("config.json", "model.safetensors", "README.md"):
            files.append({"path": fname, "sha256": sha256_file(tmp / fname), "size": (tmp / fname).stat().st_size})
        for fname in ("config.json", "model.safetensors", "README.md"):
            os.replace(tmp / fname, out / fname)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry["files"] = files
    logger.info("Wrote %s: %s", out, ", ".join(f"{f['path']} ({f['size']} bytes, sha256 {f['sha256']})"
                                             for f in files))
    return {"name": origin.name, **entry}
