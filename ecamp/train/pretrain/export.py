"""Export a training checkpoint: to the folders ``ecamp.load`` and ``ecamp.load_pretrain`` read, or to a ``.pth``
file in the authors' format that their ``Fine-tuning/*`` scripts and ``ECAMPPretrainModel.from_authors`` read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecamp.errors import CheckpointError, InvalidArgumentError

__all__ = ["export_checkpoint", "export_authors", "model_from_checkpoint"]


def model_from_checkpoint(checkpoint: str | Path):
    """The :class:`ECAMPPretrainModel` and run config stored in an ecamp training checkpoint (or a run folder's
    latest one)."""
    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.train.common.checkpoint import latest_checkpoint, load_checkpoint
    from ecamp.train.pretrain.config import PretrainRunConfig, _apply
    from ecamp.train.pretrain.loop import CHECKPOINT_FORMAT

    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint-*.pt file.", path=path)
        path = found
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an ecamp training checkpoint; the authors' .pth files go through "
                              f"`ecamp convert`.", path=path)
    cfg = PretrainRunConfig()
    _apply(cfg, json.loads(ckpt["config"]), source=f"checkpoint {path}", path=path)
    model = ECAMPPretrainModel(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, path


def export_checkpoint(checkpoint: str | Path, out: str | Path, name: str, *, hf_repo: str | None = None,
                      tokenizer: str | Path | None = None, manifest: Any = None) -> dict[str, Any]:
    """Write ``<out>/encoder`` (timm format) and ``<out>/pretrain`` (model, config, tokenizer) from a checkpoint;
    returns both manifest entries with sha256 and size. ``name`` is the encoder's manifest name or alias (e.g.
    ``cxr-vit-b``), which decides the modality and the preprocessing cfg."""
    from ecamp.config import EcampCfg
    from ecamp.convert import encoder_for, export_encoder
    from ecamp.folders import save_pretrained
    from ecamp.registry import load_manifest

    entry = load_manifest(manifest).resolve(name)
    model, cfg, path = model_from_checkpoint(checkpoint)
    encoder = encoder_for(model, name, manifest)
    tok = tokenizer or (path.parent / "tokenizer.json" if (path.parent / "tokenizer.json").is_file() else None)
    out = Path(out)
    repo = hf_repo or entry.hf_repo
    enc_entry = export_encoder(encoder, entry, out / "encoder", hf_repo=repo,
                               provenance={"checkpoint": str(path), "training_config": cfg.to_dict()})
    block = EcampCfg.from_dict(entry.ecamp).replace(
        name=entry.name.replace("vit_base_patch16_224", "ecamp_vit_base_patch16"),
        data=cfg.to_dict()["data"])  # how the run read its images (sr-windows reads them the same way)
    full = save_pretrained(model, out / "pretrain", tokenizer=tok, ecamp_cfg=block)
    return {"encoder": {"name": entry.name, "hf_repo": repo, "files": enc_entry["files"]},
            "pretrain": {"files": full["files"], "tokenizer": str(tok) if tok else None}}


def export_authors(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``{"model": state_dict}`` under the authors' key names (``ECAMPPretrainModel.to_authors_state_dict``)
    to ``out`` (a ``.pth``), and the model's sizes to ``<out stem>.config.json``; both atomically.

    The authors' fine-tuning scripts read ``checkpoint["model"]`` and take the ViT keys (``patch_embed.*``,
    ``blocks.N.*``, ``cls_token``, ``pos_embed``, ``norm.*``) by name, ignoring the rest; ``from_authors`` (and
    ``ecamp convert``) read it strictly. A model with non-default sizes needs the sidecar config there:
    ``ecamp convert FILE.pth --name cxr-vit-b --config FILE.config.json``. The BERT pooler, which their model holds
    but never uses, is written as zeros: their visualisation script loads the checkpoint with ``strict=True``
    (``from_authors`` drops it again).
    """
    import torch

    from ecamp.fileio import atomic_write

    model, _, path = model_from_checkpoint(checkpoint)
    out = Path(out)
    if out.is_dir():
        raise InvalidArgumentError(f"--out {out} is a folder; --format authors writes one file, e.g. {out}/ecamp.pth.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # clones: no tensor shares storage with another, so each is saved on its own, as the authors' files hold them
    state = {k: v.detach().cpu().clone() for k, v in model.to_authors_state_dict().items()}
    hidden = model.config.text_hidden_size
    state["bert_encoder.model.bert.pooler.dense.weight"] = torch.zeros(hidden, hidden)
    state["bert_encoder.model.bert.pooler.dense.bias"] = torch.zeros(hidden)
    atomic_write(out, lambda p: torch.save({"model": state}, p))
    config = out.with_name(out.stem + ".config.json")
    atomic_write(config, lambda p: p.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n"))
    return {"checkpoint": str(path), "out": str(out), "config": str(config), "tensors": len(state)}
