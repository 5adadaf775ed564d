"""Export a training checkpoint to the Hub folders ``ecamp.load`` and ``ECAMPPretrainModel.from_pretrained`` read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EcampError

__all__ = ["export_checkpoint", "model_from_checkpoint"]


def model_from_checkpoint(checkpoint: str | Path):
    """The :class:`ECAMPPretrainModel` and run config stored in an ecamp training checkpoint."""
    from ..models.pretrain import ECAMPPretrainModel
    from .config import PretrainRunConfig, _apply
    from .loop import latest_checkpoint, load_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise EcampError(f"{path} holds no checkpoint-*.pt file.")
        path = found
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != "ecamp-pretrain-1":
        raise EcampError(f"{path} is not an ecamp training checkpoint; the authors' .pth files go through "
                         f"`ecamp convert`.")
    cfg = PretrainRunConfig()
    _apply(cfg, json.loads(ckpt["config"]), "")
    model = ECAMPPretrainModel(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, path


def export_checkpoint(checkpoint: str | Path, out: str | Path, name: str, *, hf_repo: str | None = None,
                      tokenizer: str | Path | None = None, manifest: Any = None) -> dict[str, Any]:
    """Write ``<out>/encoder`` (timm format, via ``ecamp.save_pretrained``) and ``<out>/pretrain`` (model, config,
    tokenizer) from a checkpoint; returns both manifest entries with sha256 and size. ``name`` is the encoder's
    manifest name or alias (e.g. ``cxr-vit-b``), which decides the modality and the preprocessing cfg."""
    from ..hub import save_pretrained
    from ..registry import load_manifest

    entry = load_manifest(manifest).resolve(name)
    if entry.kind != "encoder":
        raise EcampError(f"--name must name an image encoder (e.g. cxr-vit-b), got {name} ({entry.kind}).")
    model, cfg, path = model_from_checkpoint(checkpoint)
    tok = tokenizer or (path.parent / "tokenizer.json" if (path.parent / "tokenizer.json").is_file() else None)
    out = Path(out)
    encoder = model.to_encoder(entry.ecamp.get("modality", "cxr"))
    encoder.ecamp_cfg["provenance"] = {"checkpoint": str(path), "training_config": cfg.to_dict()}
    enc_entry = save_pretrained(encoder, out / "encoder", name=entry.name, hf_repo=hf_repo or entry.hf_repo)
    block = dict(entry.ecamp, name=entry.name.replace("vit_base_patch16_224", "ecamp_vit_base_patch16"))
    full = model.save_pretrained(out / "pretrain", tokenizer=tok, ecamp_cfg=block)
    return {"encoder": {"name": entry.name, "hf_repo": hf_repo or entry.hf_repo, "files": enc_entry["files"]},
            "pretrain": {"files": full["files"], "tokenizer": str(tok) if tok else None}}
