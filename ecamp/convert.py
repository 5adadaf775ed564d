"""The authors' pre-training checkpoints (``ECAMP_ViT_Base_16.pth``) -> ecamp folders.

An image encoder is converted from the checkpoint's ViT keys alone (no BERT is built, so ``transformers`` is not
needed); a full pre-training model (``*-pretrain`` names) goes through :class:`ECAMPPretrainModel`. Both the
``ecamp convert`` command and ``ecamp train export`` write encoders through :func:`export_encoder`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError, WeightsMismatchError
from .models.pretrain import ENCODER_KEYS, ECAMPPretrainConfig, encoder_config, read_upstream_checkpoint
from .registry import ManifestLike, ModelEntry, load_manifest

__all__ = ["read_authors_checkpoint", "encoder_from_authors", "encoder_cfgs", "encoder_for", "export_encoder",
           "convert"]

PathLike = str | os.PathLike
read_authors_checkpoint = read_upstream_checkpoint


def encoder_cfgs(entry: ModelEntry, img_size: int, in_chans: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``pretrained_cfg`` and ``ecamp`` block an exported encoder of ``entry`` carries (input size from the
    weights: a non-default ``img_size`` keeps its own)."""
    pcfg = {k: v for k, v in entry.pretrained_cfg.items() if k != "hf_hub_id"}
    pcfg["input_size"] = [in_chans, img_size, img_size]
    return pcfg, dict(entry.ecamp)


def encoder_from_authors(checkpoint: PathLike | Mapping[str, torch.Tensor], *, pretrained_cfg: Mapping[str, Any],
                         ecamp_cfg: Mapping[str, Any], config: ECAMPPretrainConfig | None = None) -> nn.Module:
    """The image encoder of an authors'-format checkpoint: its ViT keys loaded strictly into a timm
    ``VisionTransformer`` (trainable position embedding, mean-pooled after the final norm)."""
    from .models.encoder import build_encoder

    cfg = config or ECAMPPretrainConfig()
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state = read_upstream_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    vit = {k: v for k, v in state.items() if ENCODER_KEYS.match(k)}
    if not any(k.startswith("blocks.") for k in vit):
        raise WeightsMismatchError(f"{source} holds no ViT encoder keys (patch_embed, blocks.*, norm); it is not an "
                                   f"ECAMP pre-training checkpoint.", path=None if source == "state dict" else source)
    encoder = build_encoder(encoder_config(cfg, pretrained_cfg))
    target = encoder.state_dict()
    missing, unexpected = sorted(set(target) - set(vit)), sorted(set(vit) - set(target))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in vit.items()
              if k in target and v.shape != target[k].shape]
    if missing or unexpected or shapes:
        raise WeightsMismatchError(f"{source} does not fit a ViT with {cfg.embed_dim}-d, {cfg.depth} blocks, "
                                   f"{cfg.img_size}-px input: missing {missing[:6]}, unexpected {unexpected[:6]}, "
                                   f"mis-shaped {shapes[:4]}. Pass --config with the checkpoint's sizes.")
    encoder.load_state_dict(vit, strict=True)
    encoder.ecamp_cfg = dict(ecamp_cfg)
    return encoder.eval()


def encoder_for(model: Any, name: str, manifest: ManifestLike = None) -> nn.Module:
    """The stand-alone encoder of an :class:`ECAMPPretrainModel`, carrying manifest entry ``name``'s preprocessing
    cfg (``name`` must be an image encoder, e.g. ``cxr-vit-b``)."""
    entry = load_manifest(manifest).resolve(name)
    if entry.kind != "encoder":
        raise InvalidArgumentError(f"--name must name an image encoder (e.g. cxr-vit-b), got {name} ({entry.kind}).")
    pcfg, block = encoder_cfgs(entry, model.config.img_size, model.config.in_chans)
    return model.to_encoder(pcfg, block)


def export_encoder(encoder: nn.Module, entry: ModelEntry, out: PathLike, *, provenance: Mapping[str, Any],
                   hf_repo: str | None = None) -> dict[str, Any]:
    """Write ``encoder`` as the timm-format folder of ``entry`` with its provenance; returns the manifest entry."""
    from .hub import save_pretrained

    encoder.ecamp_cfg = {**dict(getattr(encoder, "ecamp_cfg", None) or {}), "provenance": dict(provenance)}
    return save_pretrained(encoder, out, name=entry.name, hf_repo=hf_repo or entry.hf_repo)


def _read_config(path: PathLike | None) -> ECAMPPretrainConfig | None:
    import json

    if path is None:
        return None
    try:
        return ECAMPPretrainConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"--config {path} is not a JSON object of ECAMPPretrainConfig fields: {e}",
                                   path=path) from e


def convert(checkpoint: PathLike, name: str, *, out: PathLike | None = None, config: PathLike | None = None,
            tokenizer: PathLike | None = None, manifest: ManifestLike = None) -> dict[str, Any]:
    """Convert an authors'-format checkpoint into the folder of manifest entry ``name`` (default: the local store
    that ``ecamp.load(name)`` reads); returns ``{"out": folder, "files": [...]}``."""
    from .hub import local_store_path

    entry = load_manifest(manifest).resolve(name)
    cfg = _read_config(config)
    folder = Path(out) if out is not None else local_store_path(entry.name)
    if entry.kind == "pretrain":
        from .models.pretrain import ECAMPPretrainModel

        model = ECAMPPretrainModel.from_upstream(checkpoint, config=cfg)
        block = dict(entry.ecamp, name=entry.name, provenance={"converted_from": str(checkpoint)})
        return {"out": str(folder), "files": model.save_pretrained(folder, tokenizer=tokenizer,
                                                                   ecamp_cfg=block)["files"]}
    if tokenizer is not None:
        raise InvalidArgumentError("--tokenizer belongs to full pre-training models; an image encoder has no "
                                   "tokenizer.")
    c = cfg or ECAMPPretrainConfig()
    pcfg, block = encoder_cfgs(entry, c.img_size, c.in_chans)
    encoder = encoder_from_authors(checkpoint, pretrained_cfg=pcfg, ecamp_cfg=block, config=c)
    result = export_encoder(encoder, entry, folder, provenance={
        "converted_from": str(checkpoint), "original_file": entry.provenance.get("original_file")})
    return {"out": str(folder), "files": result["files"]}
