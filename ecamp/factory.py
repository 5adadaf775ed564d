"""``ecamp.load`` and friends: turn a name into a verified timm encoder.

Three kinds of names, as in timm:

* a manifest name or alias (``cxr-vit-b``): Hub repo and revision pinned by the manifest, every file sha256-checked;
  unpublished entries are read from the local store (see :func:`ecamp.hub.local_store_path`);
* ``hf-hub:org/repo[@revision]``: any timm-format Hub repo; its own ``config.json`` decides;
* ``local-dir:/path``: a folder written by :func:`ecamp.save_pretrained` (or timm's ``save_for_hf``).

A folder's ``config.json`` decides what is built (its ``ecamp.task``): a timm encoder or classifier, or a fine-tuned
segmentation or detection model (:func:`ecamp.models.heads.save_dense_model`; the ``best/`` folder of
``ecamp train finetune``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import (
    InvalidArgumentError,
    InvalidWeightsFileError,
    ModelFolderError,
    NotAnEncoderError,
    RemoteFileNotFoundError,
    UnknownModelError,
    WeightsNotPublishedError,
)
from .hub import download_entry, hub_download, local_store_path, split_hub_spec, verify_lfs_blob
from .registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, ManifestLike, ModelEntry, load_manifest

__all__ = ["load", "load_pretrain", "get_pretrained_cfg", "download", "resolve_files", "resolve_model_cfg"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PathLike = str | os.PathLike


@dataclass
class _Source:
    kind: str  # "manifest" | "hf-hub" | "local-dir"
    label: str
    entry: ModelEntry | None = None
    repo: str | None = None
    revision: str | None = None
    folder: Path | None = None


def _resolve(name: str, revision: str | None, manifest: ManifestLike) -> _Source:
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"Model name must be a non-empty string, got {name!r}; `ecamp list` shows the names.")
    name = name.strip()
    if name.startswith(HF_HUB_PREFIX):
        repo, rev = split_hub_spec(name[len(HF_HUB_PREFIX):])
        if rev and revision and rev != revision:
            raise InvalidArgumentError(f"{name!r} pins revision {rev!r} but revision={revision!r} was also given; "
                                       f"use one.")
        return _Source("hf-hub", name, repo=repo, revision=rev or revision)
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        return _Source("local-dir", name, folder=folder)
    entry = load_manifest(manifest).resolve(name)
    label = entry.name if name.lower() == entry.name else f"{name} ({entry.name})"
    return _Source("manifest", label, entry=entry, revision=revision)


def _read_config(path: Path, label: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidWeightsFileError(f"{path} ({label}) is not a readable config.json: {e}", path=path) from e
    if not isinstance(config, dict) or "architecture" not in _timm_config(config):
        raise InvalidWeightsFileError(f"{path} ({label}) has no 'architecture' field; it is not a timm-format "
                                      f"config.json.", path=path)
    return config


def _task(config: dict[str, Any]) -> str | None:
    """``"classification"``, ``"segmentation"`` or ``"detection"`` for a fine-tuned model; None for an encoder."""
    block = config.get("ecamp")
    return block.get("task") if isinstance(block, dict) else None


def _timm_config(config: dict[str, Any]) -> dict[str, Any]:
    """The timm-format part of a config.json: the file itself, or a dense model's ``encoder`` block."""
    from .models.heads import DENSE_TASKS

    encoder = config.get("encoder")
    return encoder if _task(config) in DENSE_TASKS and isinstance(encoder, dict) else config


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


def _wrong_kind(src: _Source, kind: str) -> NotAnEncoderError:
    short = src.label.split(" ")[0]
    if kind == "encoder":
        return NotAnEncoderError(f"{src.label} is a full pre-training model (encoder, decoder, text model); "
                                 f"ecamp.load builds image encoders. Load it with ecamp.load_pretrain({short!r}), "
                                 f"or use the matching encoder name (`ecamp list`) for features and fine-tuning.")
    return NotAnEncoderError(f"{src.label} is an image encoder; load it with ecamp.load({short!r}).")


def resolve_files(name: str | _Source, files: Sequence[str], *, kind: str = "encoder", optional: Sequence[str] = (),
                  revision: str | None = None, cache_dir: PathLike | None = None, local_files_only: bool = False,
                  force_download: bool = False, manifest: ManifestLike = None) -> tuple[_Source, dict[str, Path]]:
    """The one resolver: any model name -> local, verified paths of ``files`` (plus those of ``optional`` that
    exist). Manifest files are sha256-checked against the manifest, ``hf-hub:`` LFS files against the Hub's own
    sha256; ``local-dir:`` folders and the local store are read as they are. ``name`` may be already resolved."""
    src = name if isinstance(name, _Source) else _resolve(name, revision, manifest)
    if src.kind == "manifest":
        assert src.entry is not None
        if src.entry.kind != kind:
            raise _wrong_kind(src, kind)
        if not src.entry.published:
            store = local_store_path(src.entry.name)
            if not (store / CONFIG_NAME).is_file():
                raise _unpublished_error(src.entry)
            src = _Source("local-dir", src.label, entry=src.entry, folder=store)
    if src.kind == "local-dir":
        assert src.folder is not None
        missing = [f for f in files if not (src.folder / f).is_file()]
        if missing:
            raise ModelFolderError(f"{src.folder} ({src.label}) lacks {', '.join(missing)}. A model folder holds "
                                   f"config.json and model.safetensors, as written by ecamp.save_pretrained(model, "
                                   f"folder).", path=src.folder)
        paths = {f: src.folder / f for f in (*files, *optional) if (src.folder / f).is_file()}
        return src, paths
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


def _fetch(src_name: str, *, pretrained: bool, revision: str | None, cache_dir: PathLike | None,
           local_files_only: bool, manifest: ManifestLike
           ) -> tuple[_Source, dict[str, Any], Path | None, Path | None]:
    """Source, parsed config, weights path (None unless ``pretrained``) and config path (None for a manifest
    entry's architecture) of an image encoder."""
    src = _resolve(src_name, revision, manifest)
    if not pretrained and src.kind == "manifest" and src.entry is not None and src.entry.kind == "encoder" \
            and not src.entry.published and not (local_store_path(src.entry.name) / CONFIG_NAME).is_file():
        entry = src.entry  # the architecture alone needs no weights: build it from the manifest
        return src, {"architecture": entry.architecture, "num_classes": entry.pretrained_cfg.get("num_classes", 0),
                     "model_args": dict(entry.model_args), "pretrained_cfg": dict(entry.pretrained_cfg),
                     "ecamp": dict(entry.ecamp)}, None, None
    wanted = [CONFIG_NAME, WEIGHTS_NAME] if pretrained else [CONFIG_NAME]
    src, paths = resolve_files(src, wanted, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, manifest=manifest)
    weights = paths.get(WEIGHTS_NAME) if pretrained else None
    return src, _read_config(paths[CONFIG_NAME], src.label), weights, paths[CONFIG_NAME]


def _ecamp_block(config: dict[str, Any], src: _Source) -> dict[str, Any]:
    block = dict(config.get("ecamp") or {})
    if src.entry is not None:
        for key, value in src.entry.ecamp.items():
            block.setdefault(key, value)
        block["name"] = src.entry.name
    block["source"] = src.label
    return block


def load(
    name: str,
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
        name: manifest name or alias (``"cxr-vit-b"``), ``"hf-hub:org/repo[@revision]"`` or ``"local-dir:/path"``.
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

    The model carries timm's ``pretrained_cfg`` and ecamp's image settings in ``model.ecamp_cfg``; both feed
    :func:`ecamp.get_transform`. A fine-tuned model's folder (``config.json`` with ``ecamp.task``) gives the
    classifier (timm), :class:`~ecamp.models.SegmentationModel` or :class:`~ecamp.models.DetectionModel` it
    describes, with ``model.label_names``; :func:`ecamp.predict.predict` runs it on files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models.encoder import build_encoder, check_encoder_config, load_encoder_state_dict
    from .models.heads import DENSE_TASKS, build_dense_model, load_dense_state_dict

    src, config, weights, config_path = _fetch(name, pretrained=pretrained, revision=revision, cache_dir=cache_dir,
                                               local_files_only=local_files_only, manifest=manifest)
    config_file = config_path or f"the manifest entry of {src.label}"
    dense = _task(config) in DENSE_TASKS
    if dense and (num_classes is not None or global_pool is not None or timm_kwargs):
        raise InvalidArgumentError(f"{src.label} is a fine-tuned {_task(config)} model; num_classes, global_pool "
                                   f"and timm keyword arguments apply to encoders and classifiers only.")
    if dense:  # checks every size of config.json before building
        model = build_dense_model(config, config_file=config_file, label=src.label)
    else:
        # a hostile or broken config.json is refused here, before build_encoder allocates what it asks for
        check_encoder_config(config, overrides={**timm_kwargs, "num_classes": num_classes}, weights=weights,
                             config_file=config_file, label=src.label)
        model = build_encoder(config, num_classes=num_classes, global_pool=global_pool, **timm_kwargs)
    if weights is not None:
        try:
            state_dict = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidWeightsFileError(f"{weights} ({src.label}) is not a readable safetensors file: {e}. "
                                          f"Re-fetch or re-export it.", path=weights) from e
        if dense:
            load_dense_state_dict(model, state_dict, source=src.label)
        else:
            load_encoder_state_dict(model, state_dict, source=src.label)
    model.ecamp_cfg = _ecamp_block(config, src)
    if config.get("label_names") and (dense or num_classes is None or num_classes == config.get("num_classes")):
        model.label_names = list(config["label_names"])
        if not dense:
            model.pretrained_cfg["label_names"] = list(config["label_names"])  # as timm's hf-hub loader keeps them
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def download(name: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
             force_download: bool = False, manifest: ManifestLike = None) -> dict[str, Path]:
    """Fetch (and verify) every file of a model into the Hub cache; returns the local paths."""
    src = _resolve(name, revision, manifest)
    if src.kind == "local-dir":
        raise InvalidArgumentError(f"{name!r} is a local folder; there is nothing to download.")
    if src.kind == "manifest":
        assert src.entry is not None
        if not src.entry.published:
            raise _unpublished_error(src.entry)
        files, optional = [f.path for f in src.entry.files], []
        kind = src.entry.kind
    else:
        files, optional, kind = [CONFIG_NAME, WEIGHTS_NAME], ["README.md", "tokenizer.json"], "encoder"
    return resolve_files(src, files, kind=kind, optional=optional, revision=revision, cache_dir=cache_dir,
                         force_download=force_download, manifest=manifest)[1]


def load_pretrain(name: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
                  local_files_only: bool = False, manifest: ManifestLike = None):
    """Load a full :class:`~ecamp.models.ECAMPPretrainModel` (encoder, decoder, SR head, text model) from a folder
    written by its ``save_pretrained``: a path, ``local-dir:``, ``hf-hub:org/repo[@rev]`` or a manifest name
    (``cxr-ecamp-b-pretrain``). Needs the ``train`` extra (transformers)."""
    from .models.pretrain import ECAMPPretrainModel

    if Path(str(name)).expanduser().is_dir():
        name = LOCAL_DIR_PREFIX + str(name)
    src, paths = resolve_files(str(name), [CONFIG_NAME, WEIGHTS_NAME], kind="pretrain", optional=["tokenizer.json"],
                               revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               manifest=manifest)
    model = ECAMPPretrainModel.from_folder(paths[CONFIG_NAME].parent, config_path=paths[CONFIG_NAME],
                                           weights_path=paths[WEIGHTS_NAME])
    model.tokenizer_path = paths.get("tokenizer.json")
    return model


def get_pretrained_cfg(name: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
                       local_files_only: bool = False, manifest: ManifestLike = None) -> dict[str, Any]:
    """timm-style pretrained_cfg of a model name (input size, mean/std, interpolation, crop) with ecamp's
    image settings (modality, image policy) under the ``"ecamp"`` key. Manifest names need no download."""
    src = _resolve(name, revision, manifest)
    if src.kind == "manifest":
        assert src.entry is not None
        return src.entry.full_pretrained_cfg()
    src, config, _, _ = _fetch(name, pretrained=False, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, manifest=manifest)
    timm_cfg = _timm_config(config)
    cfg = dict(timm_cfg.get("pretrained_cfg") or {})
    cfg.setdefault("architecture", timm_cfg["architecture"])
    cfg["num_classes"] = config.get("num_classes", cfg.get("num_classes"))
    cfg["ecamp"] = _ecamp_block(config, src)
    return cfg


def resolve_model_cfg(model: nn.Module) -> dict[str, Any]:
    """The same dict as :func:`get_pretrained_cfg`, read off a loaded model (any timm model works)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if not cfg:
        raise InvalidArgumentError(f"{type(model).__name__} has no pretrained_cfg; pass a model name or a timm "
                                   f"model to get_transform (a segmentation or detection model's input: "
                                   f"ecamp.predict.input_transform(model)).")
    cfg["ecamp"] = dict(getattr(model, "ecamp_cfg", None) or {})
    return cfg
