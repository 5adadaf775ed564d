"""Builders the test modules share: tiny encoders, Hub manifests, pre-training batches and configuration
overrides, and DICOM files. Heavy imports stay inside the functions, so importing this module costs nothing."""

from __future__ import annotations

import json
from pathlib import Path

# The size of the tiny encoders of :func:`make_tiny_encoder` (64-px input, embeddings of 48).
TINY_ARGS = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 64}

# A tiny pre-training model (64-px encoder input on a 4x4 grid, text of 32 tokens) as ``load_config`` overrides.
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2", "model.sr_window=3",
              "model.vocab_size=256", "model.text_hidden_size=32", "model.text_layers=1", "model.text_heads=2",
              "model.text_intermediate_size=64", "model.max_text_len=32"]
# A very small pre-training run of that model: the tokenizer is ``tokenizer.json`` in the data root.
TINY_RUN = [*TINY_MODEL, "optim.batch_size=4", "optim.accum_iter=2", "optim.epochs=3", "optim.warmup_epochs=1",
            "optim.schedule_epochs=3", "optim.lr=1e-3", "run.num_workers=0", "run.precision=fp32", "run.save_every=2",
            "run.keep_last=2", "data.tokenizer=tokenizer.json"]

# The shape of :func:`pretrain_batch`: images and reports of this many samples, texts of this many tokens.
BATCH_SIZE, TEXT_LEN = 2, 24


def make_tiny_encoder(seed: int = 0, modality: str = "cxr"):
    """A small randomly initialised ECAMP-style encoder (timm ViT, avg pool of patch tokens, no fc_norm)."""
    import timm
    import torch

    import ecamp

    cfg = ecamp.get_pretrained_cfg("cxr-vit-b" if modality == "cxr" else "fundus-vit-b")
    block = cfg.pop("ecamp")
    cfg["input_size"] = [3, 64, 64]
    for key in ("hf_hub_id", "tag"):
        cfg.pop(key, None)
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg=cfg, num_classes=0,
                              global_pool="avg", fc_norm=False, **TINY_ARGS)
    from ecamp.config import EcampCfg

    model.ecamp_cfg = EcampCfg.from_dict(block).replace(name=None, source=None)
    return model.eval()


def folder_files(folder: Path) -> dict[str, bytes]:
    """``{name: bytes}`` of the files directly inside ``folder``, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def write_manifest(path: Path, repo: str, revision: str, files: dict[str, bytes], *, name: str = "tiny.ecamp_test",
                   alias: str = "tiny-cxr") -> Path:
    """A manifest with one published entry for ``repo`` at ``revision`` (built from the packaged CXR entry)."""
    import hashlib

    import ecamp

    packaged = json.loads((Path(ecamp.__file__).parent / "weights_manifest.json").read_text())
    entry = dict(packaged["models"]["vit_base_patch16_224.ecamp_mimic_cxr"])
    config = json.loads(files["config.json"])
    entry.update(
        aliases=[alias], hf_repo=repo, revision=revision, published=True,
        model_args=config["model_args"], pretrained_cfg={**entry["pretrained_cfg"], "input_size": [3, 64, 64]},
        files=[{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in files.items()],
    )
    path.write_text(json.dumps({"schema_version": 1, "models": {name: entry}}, indent=2))
    return path


def pretrain_batch(cfg, seed: int = 0) -> dict:
    """A pre-training batch of :data:`BATCH_SIZE` samples for an ``ECAMPPretrainConfig``: images at the SR size,
    reports of :data:`TEXT_LEN` tokens (the second padded from token 18, tokens 3-8 masked), weights and SR
    windows."""
    import torch

    b, length = BATCH_SIZE, TEXT_LEN
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (b, length), generator=g)
    ids[:, 0] = 2
    attention = torch.ones(b, length, dtype=torch.long)
    attention[1, 18:] = 0
    ids[1, 18:] = 0
    masked = ids.clone()
    masked[:, 3:9] = 3
    weights = torch.rand(b, length, generator=g) + 0.5
    return {"image": torch.randn(b, 3, cfg.sr_img_size, cfg.sr_img_size, generator=g), "input_ids": masked,
            "labels": ids, "attention_mask": attention, "token_type_ids": torch.zeros(b, length, dtype=torch.long),
            "weights": weights, "sr_window": torch.tensor([[0, 1], [1, 0]])}


def write_dicom(folder: Path, arr, name: str = "x.dcm", **attrs) -> Path:
    """``folder/name``: an uncompressed (explicit VR little endian) secondary-capture DICOM file of ``arr``.

    ``arr`` is one frame ``(rows, cols)``, frames ``(n, rows, cols)`` or, with ``SamplesPerPixel=3``, one RGB frame
    ``(rows, cols, 3)``; MONOCHROME2 with every allocated bit stored unless ``attrs`` (DICOM keywords) say
    otherwise."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = arr.shape[0] if arr.ndim == 3 and "SamplesPerPixel" not in attrs else 1
    ds.Rows, ds.Columns = arr.shape[-2:] if frames > 1 else arr.shape[:2]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PixelData = arr.tobytes()
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path
