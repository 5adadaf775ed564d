"""The one resolver, and what is built on it: ``ecamp.load``, ``load_pretrain``, ``download``,
``get_pretrained_cfg`` and ``get_transform``.

:func:`resolve` is the only place a model name is interpreted, as in timm:

* a manifest name or alias (``cxr-vit-b``): Hub repo and revision pinned by the manifest, every file sha256-checked;
  unpublished entries are read from the local store (see :func:`ecamp.hub.local_store_path`);
* ``hf-hub:org/repo[@revision]``: any Hub repo of an ecamp or timm-format folder; its own ``config.json`` decides;
* ``local-dir:/path``, or a path to a folder: a folder written by :func:`ecamp.save_pretrained` (or timm's
  ``save_for_hf``).

:func:`resolve_files` turns the result into verified local files. A folder's ``config.json`` decides what is built
(:class:`~ecamp.config.ModelConfig` ``kind``, :mod:`ecamp.folders`): a timm encoder or classifier, or a fine-tuned
segmentation or detection model (the ``best/`` folder of ``ecamp train finetune``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DENSE_TASKS, EcampCfg, ModelConfig
from .errors import (
    InvalidArgumentError,
    ModelFolderError,
    NotAnEncoderError,
    RemoteFileNotFoundError,
    UnknownModelError,
    WeightsNotPublishedError,
)
from .folders import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME
from .hub import download_entry, hub_download, local_store_path, split_hub_spec, verify_lfs_blob
from .registry import ManifestLike, ModelEntry, load_manifest

__all__ = ["load", "load_pretrain", "get_pretrained_cfg", "get_transform", "download", "resolve", "resolve_files",
           "resolve_model_cfg", "Source", "HF_HUB_PREFIX", "LOCAL_DIR_PREFIX"]

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
PathLike = str | os.PathLike


@dataclass(frozen=True)
class Source:
    """Where a model name points: a manifest entry (``kind="manifest"``), a Hub repo (``"hf-hub"``), a folder
    (``"local-dir"``) or the local store of an unpublished entry (``"local-store"``). ``label`` names it in
    messages and becomes ``ecamp_cfg.source`` of what is loaded from it."""

    kind: str
    label: str
    entry: ModelEntry | None = None
    repo: str | None = None
    revision: str | None = None
    folder: Path | None = None

    @property
    def local(self) -> bool:
        return self.kind in ("local-dir", "local-store")


def _looks_like_path(name: str) -> bool:
    """Written like a path (a separator, ``.``, ``~``): manifest names never are."""
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def _is_dir(name: str) -> bool:
    try:
        return Path(name).expanduser().is_dir()
    except (OSError, RuntimeError, ValueError):  # an unknown ~user, a name too long for the file system
        return False


def resolve(name: str | os.PathLike, revision: str | None = None, manifest: ManifestLike = None) -> Source:
    """The one place a model name is interpreted: ``hf-hub:org/repo[@rev]``, ``local-dir:/path``, a path to a
    folder, or a manifest name or alias (case-insensitive; unpublished entries resolve to the local store when it
    holds them). Nothing is downloaded."""
    if isinstance(name, os.PathLike):  # a path is always a folder
        return Source("local-dir", LOCAL_DIR_PREFIX + os.fspath(name), folder=Path(name).expanduser())
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"Model name must be a non-empty string, got {name!r}; `ecamp list` shows the names.")
    name = name.strip()
    if name.startswith(HF_HUB_PREFIX):
        repo, rev = split_hub_spec(name[len(HF_HUB_PREFIX):])
        if rev and revision and rev != revision:
            raise InvalidArgumentError(f"{name!r} pins revision {rev!r} but revision={revision!r} was also given; "
                                       f"use one.")
        return Source("hf-hub", name, repo=repo, revision=rev or revision)
    if name.startswith(LOCAL_DIR_PREFIX):
        return Source("local-dir", name, folder=Path(name[len(LOCAL_DIR_PREFIX):]).expanduser())
    if _looks_like_path(name):
        if not _is_dir(name):
            raise ModelFolderError(f"{name!r} is not a folder (no such directory). Give the folder ecamp wrote, a "
                                   f"manifest name (`ecamp list`), or write a Hub repo as 'hf-hub:org/name'.",
                                   path=name)
        return Source("local-dir", LOCAL_DIR_PREFIX + name, folder=Path(name).expanduser())
    try:
        entry = load_manifest(manifest).resolve(name)
    except UnknownModelError:
        if _is_dir(name):  # a folder in the working directory, named like no model
            return Source("local-dir", LOCAL_DIR_PREFIX + name, folder=Path(name))
        raise
    label = entry.name if name.lower() == entry.name else f"{name} ({entry.name})"
    if not entry.published and (local_store_path(entry.name) / CONFIG_NAME).is_file():
        return Source("local-store", label, entry=entry, folder=local_store_path(entry.name))
    return Source("manifest", label, entry=entry, revision=revision)


def _unpublished_error(entry: ModelEntry) -> WeightsNotPublishedError:
    alias = entry.aliases[0] if entry.aliases else entry.name
    prov = entry.provenance
    origin = prov.get("original_file") or "the authors' checkpoint"
    where = f" ({prov['original_url']})" if prov.get("original_url") else ""
    keep_tok = " (add --tokenizer mimic_wordpiece.json to keep their tokenizer)" if entry.kind == "pretrain" else ""
    fallback = " pretrained=False builds the architecture without weights." if entry.kind == "encoder" else ""
    how = (f"Fetch and convert the authors' release once with `ecamp convert --from-authors {alias}` (needs "
           f"pip install \"ecamp[authors]\"), or download {origin}{where} yourself and run "
           if prov.get("original_url") else f"Download the authors' release {origin} and convert it once with ")
    return WeightsNotPublishedError(
        f"The weights of {alias!r} ({entry.name}) are not published on the Hub yet (planned repo "
        f"{entry.hf_repo}). {how}"
        f"`ecamp convert {origin} --name {alias}`{keep_tok}; it is then found offline in the local store "
        f"{local_store_path(entry.name)}.{fallback}", repo_id=entry.hf_repo, path=local_store_path(entry.name))


def _wrong_kind(src: Source, kind: str) -> NotAnEncoderError:
    short = src.label.split(" ")[0]
    if kind == "encoder":
        return NotAnEncoderError(f"{src.label} is a full pre-training model (encoder, decoder, text model); "
                                 f"ecamp.load builds image encoders. Load it with ecamp.load_pretrain({short!r}), "
                                 f"or use the matching encoder name (`ecamp list`) for features and fine-tuning.")
    return NotAnEncoderError(f"{src.label} is an image encoder or a fine-tuned model, not a full pre-training model; "
                             f"load it with ecamp.load({short!r}). What needs the full model (ecamp.load_pretrain, "
                             f"`ecamp explain --text`, `ecamp train sr-windows`) takes the pretrain/ folder that "
                             f"`ecamp train export` writes.")


def resolve_files(name: str | os.PathLike | Source, files: Sequence[str], *, kind: str = "encoder",
                  optional: Sequence[str] = (), revision: str | None = None, cache_dir: PathLike | None = None,
                  local_files_only: bool = False, force_download: bool = False, manifest: ManifestLike = None
                  ) -> tuple[Source, dict[str, Path]]:
    """Any model name (or an already resolved :class:`Source`) -> local, verified paths of ``files`` (plus those
    of ``optional`` that exist). Manifest files are sha256-checked against the manifest, ``hf-hub:`` LFS files
    against the Hub's own sha256; folders and the local store are read as they are. ``kind`` is the manifest kind
    the caller builds (``"encoder"``: ecamp.load, ``"pretrain"``: ecamp.load_pretrain)."""
    src = name if isinstance(name, Source) else resolve(name, revision, manifest)
    if src.entry is not None and src.entry.kind != kind:
        raise _wrong_kind(src, kind)
    if src.kind == "manifest" and not src.entry.published:
        raise _unpublished_error(src.entry)
    if src.local:
        assert src.folder is not None
        missing = [f for f in files if not (src.folder / f).is_file()]
        if missing:
            raise ModelFolderError(f"{src.folder} ({src.label}) lacks {', '.join(missing)}. A model folder holds "
                                   f"config.json and model.safetensors, as written by ecamp.save_pretrained(model, "
                                   f"folder).", path=src.folder)
        return src, {f: src.folder / f for f in (*files, *optional) if (src.folder / f).is_file()}
    if src.kind == "hf-hub":
        assert src.repo is not None
        paths = {}
        for f in (*files, *optional):
            try:
                paths[f] = hub_download(src.repo, f, revision=src.revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only, force_download=force_download)
            except RemoteFileNotFoundError:
                if f in files:
                    raise
                continue
            if f.endswith(".safetensors"):
                verify_lfs_blob(paths[f])
        return src, paths
    entry = src.entry
    assert entry is not None
    listed = {f.path for f in entry.files}
    paths = download_entry(entry, revision=src.revision, cache_dir=cache_dir, local_files_only=local_files_only,
                           force_download=force_download, files=[*files, *(f for f in optional if f in listed)])
    return src, paths


def _fetch(src: Source, *, pretrained: bool, cache_dir: PathLike | None, local_files_only: bool
           ) -> tuple[Source, ModelConfig, Path | None, str]:
    """Source, config, weights path (None unless ``pretrained``) and the config's place (for messages) of an
    image model."""
    entry = src.entry
    if not pretrained and src.kind == "manifest" and entry is not None and entry.kind == "encoder" \
            and not entry.published and entry.ecamp.get("task") not in DENSE_TASKS:
        # an encoder's architecture alone needs no weights: build it from the manifest
        config = {"architecture": entry.architecture, "num_classes": entry.pretrained_cfg.get("num_classes", 0),
                  "model_args": dict(entry.model_args), "pretrained_cfg": dict(entry.pretrained_cfg),
                  "ecamp": dict(entry.ecamp)}
        where = f"the manifest entry of {src.label}"
        return src, ModelConfig.from_dict(config, where=where), None, where
    wanted = [CONFIG_NAME, WEIGHTS_NAME] if pretrained else [CONFIG_NAME]
    src, paths = resolve_files(src, wanted, cache_dir=cache_dir, local_files_only=local_files_only)
    return src, ModelConfig.read(paths[CONFIG_NAME], src.label), paths.get(WEIGHTS_NAME), str(paths[CONFIG_NAME])


def _loaded_cfg(cfg: ModelConfig, src: Source) -> EcampCfg:
    """The block a model from ``src`` carries: the folder's own, completed by its manifest entry's image settings,
    with the entry's name and where it came from (``source``)."""
    return _with_entry(cfg.ecamp, src)


def _with_entry(block: EcampCfg, src: Source) -> EcampCfg:
    if src.entry is not None:  # the folder's own keys win; the entry fills in what it does not say
        missing = {k: v for k, v in src.entry.ecamp.items() if k not in block.keys}
        block = EcampCfg.from_dict({**block.to_dict(), **missing, "name": src.entry.name})
    return block.replace(source=src.label)


def load(
    name: str | os.PathLike,
    *,
    pretrained: bool = True,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_classes: int | None = None,
    global_pool: str | None = None,
    manifest: ManifestLike = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Load an ECAMP image encoder as a timm ``VisionTransformer`` in eval mode, or a fine-tuned model.

    Args:
        name: manifest name or alias (``"cxr-vit-b"``), ``"hf-hub:org/repo[@revision]"``, ``"local-dir:/path"``
            or a path to a folder.
        pretrained: load the weights (sha256-verified for manifest names); False gives a random initialisation.
        revision: Hub branch, tag or commit; manifest names default to their pinned commit.
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        local_files_only: never touch the network (as ``HF_HUB_OFFLINE=1``).
        device, dtype: where and in which floating dtype to put the model.
        num_classes: size of a fresh classification head; None keeps the weights' own (0 for ECAMP encoders,
            so the model returns the pooled embedding).
        global_pool: pooling override (``"avg"``, ``"token"``...); None keeps the weights' own. ECAMP encoders pool
            the mean of the patch tokens after the pre-trained final norm (``global_pool="avg", fc_norm=False``).
        manifest: another manifest file (default: ``$ECAMP_MANIFEST`` or the packaged one).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``img_size``, ``fc_norm``).

    The model carries timm's ``pretrained_cfg`` and ecamp's settings as ``model.ecamp_cfg``
    (:class:`~ecamp.config.EcampCfg`); both feed :func:`get_transform`. A fine-tuned model's folder gives the
    classifier (timm), :class:`~ecamp.models.SegmentationModel` or :class:`~ecamp.models.DetectionModel` it
    describes (:mod:`ecamp.folders`), with ``model.label_names``; :func:`ecamp.predict.predict` runs it on files.
    """
    from .folders import build, load_weights

    src, cfg, weights, where = _fetch(resolve(name, revision, manifest), pretrained=pretrained, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
    if cfg.kind == "pretrain":
        raise _wrong_kind(src, "encoder")
    model = build(cfg, config_file=where, label=src.label, weights=weights, num_classes=num_classes,
                  global_pool=global_pool, **timm_kwargs)
    if weights is not None:
        load_weights(model, weights, source=src.label)
    model.ecamp_cfg = _loaded_cfg(cfg, src)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def download(name: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
             force_download: bool = False, manifest: ManifestLike = None) -> dict[str, Path]:
    """Fetch (and verify) every file of a model into the Hub cache; returns the local paths."""
    src = resolve(name, revision, manifest)
    if src.kind == "local-dir":
        raise InvalidArgumentError(f"{name!r} is a local folder; there is nothing to download.")
    if src.entry is not None:
        if not src.entry.published:
            raise _unpublished_error(src.entry)
        files, optional, kind = [f.path for f in src.entry.files], [], src.entry.kind
    else:
        files, optional, kind = [CONFIG_NAME, WEIGHTS_NAME], ["README.md", TOKENIZER_NAME], "encoder"
    return resolve_files(src, files, kind=kind, optional=optional, cache_dir=cache_dir,
                         force_download=force_download)[1]


def load_pretrain(name: str | os.PathLike, *, revision: str | None = None, cache_dir: PathLike | None = None,
                  local_files_only: bool = False, manifest: ManifestLike = None):
    """Load a full :class:`~ecamp.models.ECAMPPretrainModel` (encoder, decoder, SR head, text model) from a folder
    written by its ``save_pretrained``: a path, ``local-dir:``, ``hf-hub:org/repo[@rev]`` or a manifest name
    (``cxr-ecamp-b-pretrain``). Needs the ``train`` extra (transformers)."""
    from .models.pretrain import ECAMPPretrainModel

    src, paths = resolve_files(name, [CONFIG_NAME, WEIGHTS_NAME], kind="pretrain", optional=[TOKENIZER_NAME],
                               revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               manifest=manifest)
    cfg = ModelConfig.read(paths[CONFIG_NAME], src.label)
    if cfg.kind != "pretrain":
        raise _wrong_kind(src, "pretrain")
    model = ECAMPPretrainModel.from_folder(paths[CONFIG_NAME].parent, config_path=paths[CONFIG_NAME],
                                           weights_path=paths[WEIGHTS_NAME])
    model.ecamp_cfg = _loaded_cfg(ModelConfig.from_dict({**cfg.data, "ecamp": model.ecamp_cfg.to_dict()}), src)
    model.tokenizer_path = paths.get(TOKENIZER_NAME)
    return model


def get_pretrained_cfg(name: str | os.PathLike, *, revision: str | None = None, cache_dir: PathLike | None = None,
                       local_files_only: bool = False, manifest: ManifestLike = None) -> dict[str, Any]:
    """timm-style pretrained_cfg of a model name (input size, mean/std, interpolation, crop) with ecamp's
    settings (:class:`~ecamp.config.EcampCfg` as a dict) under the ``"ecamp"`` key, the same block
    ``load(name).ecamp_cfg`` carries. Manifest names need no download."""
    src = resolve(name, revision, manifest)
    if src.entry is not None:  # the manifest says it all, published or in the local store
        cfg = src.entry.full_pretrained_cfg()
        cfg["ecamp"] = _with_entry(EcampCfg.from_dict(src.entry.ecamp), src).to_dict(with_source=True)
        return cfg
    src, config, _, _ = _fetch(src, pretrained=False, cache_dir=cache_dir, local_files_only=local_files_only)
    cfg = config.pretrained_cfg
    cfg.setdefault("architecture", config.architecture)
    cfg["num_classes"] = config.num_classes if "num_classes" in config.data else cfg.get("num_classes")
    cfg["ecamp"] = _loaded_cfg(config, src).to_dict(with_source=True)
    return cfg


def resolve_model_cfg(model: nn.Module) -> dict[str, Any]:
    """The same dict as :func:`get_pretrained_cfg`, read off a loaded model (any timm model works)."""
    from .config import ecamp_cfg_of

    pcfg = getattr(model, "pretrained_cfg", None)
    if not pcfg:
        raise InvalidArgumentError(f"{type(model).__name__} has no pretrained_cfg; pass a model name or a timm "
                                   f"model to get_transform (a segmentation or detection model's input: "
                                   f"ecamp.predict.input_transform(model)).")
    cfg = dict(pcfg)
    cfg["ecamp"] = ecamp_cfg_of(model).to_dict(with_source=True)
    return cfg


def get_transform(name_or_model: Any, *, train: bool = False, **overrides: Any):
    """The preprocessing for a model name, a loaded model or a cfg dict (:class:`~ecamp.transforms.EcampTransform`).

    ``overrides`` replace cfg fields: ``input_size``/``img_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, ``crop_mode`` (``center`` or ``squash``), and the ecamp settings ``grayscale``, ``image_policy``,
    ``fov_crop``. A segmentation or detection model reads its images whole
    (:func:`ecamp.predict.input_transform`).
    """
    from .transforms import transform_from_cfg

    if isinstance(name_or_model, (str, os.PathLike)):
        cfg = get_pretrained_cfg(name_or_model)
    elif isinstance(name_or_model, dict):
        cfg = dict(name_or_model)
    elif isinstance(name_or_model, nn.Module):
        cfg = resolve_model_cfg(name_or_model)
    else:
        raise InvalidArgumentError(f"get_transform takes a model name, a model or a cfg dict, not "
                                   f"{type(name_or_model).__name__}.")
    return transform_from_cfg(cfg, train=train, **overrides)
