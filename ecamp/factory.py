"""``ecamp.load`` and friends: turn a name into a verified timm encoder.

Three kinds of names, as in timm:

* a manifest name or alias (``cxr-vit-b``): Hub repo and revision pinned by the manifest, every file sha256-checked;
  unpublished entries are read from the local store (see :func:`ecamp.hub.local_store_path`);
* ``hf-hub:org/repo[@revision]``: any timm-format Hub repo; its own ``config.json`` decides;
* ``local-dir:/path``: a folder written by :func:`ecamp.save_pretrained` (or timm's ``save_for_hf``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import (
    EcampError,
    InvalidWeightsFileError,
    ModelFolderError,
    NotAnEncoderError,
    RemoteFileNotFoundError,
    WeightsNotPublishedError,
)
from .hub import download_entry, hub_download, local_store_path, split_hub_spec, verify_lfs_blob
from .registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, ManifestLike, ModelEntry, load_manifest

__all__ = ["load", "get_pretrained_cfg", "download", "resolve_model_cfg"]

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
        raise EcampError(f"Model name must be a non-empty string, got {name!r}; `ecamp list` shows the names.")
    name = name.strip()
    if name.startswith(HF_HUB_PREFIX):
        repo, rev = split_hub_spec(name[len(HF_HUB_PREFIX):])
        if rev and revision and rev != revision:
            raise EcampError(f"{name!r} pins revision {rev!r} but revision={revision!r} was also given; use one.")
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
        raise InvalidWeightsFileError(f"{path} ({label}) is not a readable config.json: {e}") from e
    if not isinstance(config, dict) or "architecture" not in config:
        raise InvalidWeightsFileError(f"{path} ({label}) has no 'architecture' field; it is not a timm-format "
                                      f"config.json.")
    return config


def _folder_files(folder: Path, label: str, need_weights: bool) -> tuple[Path, Path | None]:
    cfg, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [p.name for p in ((cfg, weights) if need_weights else (cfg,)) if not p.is_file()]
    if missing:
        raise ModelFolderError(f"{folder} ({label}) lacks {', '.join(missing)}. A model folder holds config.json "
                               f"and model.safetensors, as written by ecamp.save_pretrained(model, folder).")
    return cfg, (weights if need_weights else None)


def _unpublished_error(entry: ModelEntry) -> WeightsNotPublishedError:
    alias = entry.aliases[0] if entry.aliases else entry.name
    prov = entry.provenance
    origin = prov.get("original_file") or "the authors' checkpoint"
    where = f" ({prov['original_url']})" if prov.get("original_url") else ""
    return WeightsNotPublishedError(
        f"The weights of {alias!r} ({entry.name}) are not published on the Hub yet (planned repo "
        f"{entry.hf_repo}). Download the authors' release {origin}{where} and convert it once with "
        f"`ecamp convert {origin} --name {alias}`; ecamp.load({alias!r}) then finds it offline in the local store "
        f"{local_store_path(entry.name)}. pretrained=False builds the architecture without weights."
    )


def _fetch(src: _Source, *, pretrained: bool, cache_dir: PathLike | None, local_files_only: bool,
           force_download: bool = False) -> tuple[dict[str, Any], Path | None]:
    """Config (parsed) and weights path (None unless ``pretrained``) for a resolved source."""
    if src.kind == "local-dir":
        assert src.folder is not None
        cfg_path, weights = _folder_files(src.folder, src.label, pretrained)
        return _read_config(cfg_path, src.label), weights
    if src.kind == "hf-hub":
        assert src.repo is not None
        cfg_path = hub_download(src.repo, CONFIG_NAME, revision=src.revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, force_download=force_download)
        weights = None
        if pretrained:
            weights = hub_download(src.repo, WEIGHTS_NAME, revision=src.revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, force_download=force_download)
            verify_lfs_blob(weights)
        return _read_config(cfg_path, src.label), weights
    entry = src.entry
    assert entry is not None
    if entry.kind != "encoder":
        raise NotAnEncoderError(f"{src.label} is a full pre-training model (encoder, decoder, text model); "
                                f"ecamp.load builds image encoders. Load it with "
                                f"ecamp.models.ECAMPPretrainModel.from_pretrained({src.label.split(' ')[0]!r}), or "
                                f"use the matching encoder name (`ecamp list`) for features and fine-tuning.")
    if entry.published:
        wanted = [CONFIG_NAME, WEIGHTS_NAME] if pretrained else [CONFIG_NAME]
        paths = download_entry(entry, revision=src.revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               force_download=force_download, files=wanted)
        return _read_config(paths[CONFIG_NAME], src.label), paths[WEIGHTS_NAME] if pretrained else None
    store = local_store_path(entry.name)
    if (store / CONFIG_NAME).is_file():
        cfg_path, weights = _folder_files(store, f"{src.label}, local store", pretrained)
        return _read_config(cfg_path, src.label), weights
    if pretrained:
        raise _unpublished_error(entry)
    return {"architecture": entry.architecture, "num_classes": entry.pretrained_cfg.get("num_classes", 0),
            "model_args": dict(entry.model_args), "pretrained_cfg": dict(entry.pretrained_cfg),
            "ecamp": dict(entry.ecamp)}, None


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
    """Load an ECAMP image encoder as a timm ``VisionTransformer`` in eval mode.

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
    :func:`ecamp.get_transform`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models.encoder import build_encoder, load_encoder_state_dict

    src = _resolve(name, revision, manifest)
    config, weights = _fetch(src, pretrained=pretrained, cache_dir=cache_dir, local_files_only=local_files_only)
    model = build_encoder(config, num_classes=num_classes, global_pool=global_pool, **timm_kwargs)
    if weights is not None:
        try:
            state_dict = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidWeightsFileError(f"{weights} ({src.label}) is not a readable safetensors file: {e}. "
                                          f"Re-fetch or re-export it.") from e
        load_encoder_state_dict(model, state_dict, source=src.label)
    model.ecamp_cfg = _ecamp_block(config, src)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def download(name: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
             force_download: bool = False, manifest: ManifestLike = None) -> dict[str, Path]:
    """Fetch (and for manifest names verify) every file of a model into the Hub cache; returns the local paths."""
    src = _resolve(name, revision, manifest)
    if src.kind == "local-dir":
        raise EcampError(f"{name!r} is a local folder; there is nothing to download.")
    if src.kind == "hf-hub":
        assert src.repo is not None
        paths = {}
        for fname in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
            try:
                paths[fname] = hub_download(src.repo, fname, revision=src.revision, cache_dir=cache_dir,
                                            force_download=force_download)
            except RemoteFileNotFoundError:
                if fname == "README.md":  # a model card is optional
                    continue
                raise
        verify_lfs_blob(paths[WEIGHTS_NAME])
        return paths
    entry = src.entry
    assert entry is not None
    if not entry.published:
        raise _unpublished_error(entry)
    return download_entry(entry, revision=revision, cache_dir=cache_dir, force_download=force_download)


def get_pretrained_cfg(name: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
                       local_files_only: bool = False, manifest: ManifestLike = None) -> dict[str, Any]:
    """timm-style pretrained_cfg of a model name (input size, mean/std, interpolation, crop) with ecamp's
    image settings (modality, image policy) under the ``"ecamp"`` key. Manifest names need no download."""
    src = _resolve(name, revision, manifest)
    if src.kind == "manifest":
        assert src.entry is not None
        return src.entry.full_pretrained_cfg()
    config, _ = _fetch(src, pretrained=False, cache_dir=cache_dir, local_files_only=local_files_only)
    cfg = dict(config.get("pretrained_cfg") or {})
    cfg.setdefault("architecture", config["architecture"])
    cfg["num_classes"] = config.get("num_classes", cfg.get("num_classes"))
    cfg["ecamp"] = _ecamp_block(config, src)
    return cfg


def resolve_model_cfg(model: nn.Module) -> dict[str, Any]:
    """The same dict as :func:`get_pretrained_cfg`, read off a loaded model (any timm model works)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if not cfg:
        raise EcampError(f"{type(model).__name__} has no pretrained_cfg; pass a model name or a timm model to "
                         f"get_transform.")
    cfg["ecamp"] = dict(getattr(model, "ecamp_cfg", None) or {})
    return cfg
