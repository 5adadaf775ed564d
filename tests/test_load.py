"""ecamp.load from local folders and the local store; strict loading; save_pretrained; the embedding."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import ecamp
from ecamp.errors import (
    EcampError,
    InvalidWeightsFileError,
    ModelFolderError,
    NotAnEncoderError,
    WeightsMismatchError,
    WeightsNotPublishedError,
)
from ecamp.hub import local_store_path

from helpers.builders import make_tiny_encoder

ROOT = Path(__file__).resolve().parents[1]


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_local_dir_roundtrip_is_bit_identical(tiny_folder):
    model = ecamp.load(f"local-dir:{tiny_folder}")
    with torch.no_grad():
        assert torch.equal(model(_x()), make_tiny_encoder()(_x()))
    assert model.ecamp_cfg.name == "tiny-cxr"


def test_default_embedding_is_mean_of_normed_patch_tokens(tiny_folder):
    model = ecamp.load(f"local-dir:{tiny_folder}")
    with torch.no_grad():
        tokens = model.forward_features(_x())
        pooled = model(_x())
    assert tokens.shape == (2, 1 + 16, 48)
    assert torch.allclose(pooled, tokens[:, 1:].mean(1), atol=1e-6)
    assert isinstance(model.fc_norm, torch.nn.Identity)


def test_fresh_head_is_reported(tiny_folder, caplog):
    with caplog.at_level(logging.INFO, logger="ecamp"):
        model = ecamp.load(f"local-dir:{tiny_folder}", num_classes=5)
    assert model.num_classes == 5 and model(_x()).shape == (2, 5)
    assert "head.weight" in caplog.text and "freshly initialised" in caplog.text
    # a fine-tuned folder with a 5-class head, reloaded with 3 classes: the old head is dropped, by name
    out = tiny_folder.parent / "five-class"
    ecamp.save_pretrained(model, out)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ecamp"):
        again = ecamp.load(f"local-dir:{out}", num_classes=3)
    assert again.num_classes == 3
    dropped = re.search(r"dropped checkpoint keys (\[.*?\])", caplog.text).group(1)
    assert sorted(eval(dropped)) == ["head.bias", "head.weight"]
    # and its own head by default: the folder's config.json decides
    same = ecamp.load(f"local-dir:{out}")
    with torch.no_grad():
        assert torch.equal(same(_x()), model(_x()))


def test_authors_finetune_head_fresh_fc_norm(tiny_folder, caplog):
    with caplog.at_level(logging.INFO, logger="ecamp"):
        model = ecamp.load(f"local-dir:{tiny_folder}", num_classes=2, fc_norm=True)
    assert not isinstance(model.fc_norm, torch.nn.Identity)
    assert "norm.weight" in caplog.text and "fc_norm.weight" in caplog.text


def test_mismatching_weights_raise(tiny_folder, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["model_args"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightsMismatchError, match=r"missing blocks\.2\."):
        ecamp.load(f"local-dir:{folder}")
    with pytest.raises(WeightsMismatchError, match="mis-shaped"):
        ecamp.load(f"local-dir:{tiny_folder}", embed_dim=96, num_heads=3)


def test_bad_folders(tmp_path, tiny_folder):
    with pytest.raises(ModelFolderError, match="config.json"):
        ecamp.load(f"local-dir:{tmp_path}")
    folder = tmp_path / "trunc"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(InvalidWeightsFileError, match="safetensors"):
        ecamp.load(f"local-dir:{folder}")
    (folder / "config.json").write_text("{")
    with pytest.raises(InvalidWeightsFileError, match="config.json"):
        ecamp.load(f"local-dir:{folder}")


def test_unpublished_weights_point_to_convert():
    with pytest.raises(WeightsNotPublishedError) as err:
        ecamp.load("cxr-vit-b")
    msg = str(err.value)
    assert "ecamp convert ECAMP_ViT_Base_16.pth --name cxr-vit-b" in msg
    assert "drive.google.com" in msg and str(local_store_path("vit_base_patch16_224.ecamp_mimic_cxr")) in msg
    with pytest.raises(WeightsNotPublishedError):
        ecamp.download("fundus-vit-b")


def test_pretrain_entries_are_not_encoders():
    with pytest.raises(NotAnEncoderError, match="pre-training model"):
        ecamp.load("cxr-ecamp-b-pretrain")


def test_random_init_full_size_architecture():
    model = ecamp.load("fundus-vit-b", pretrained=False)
    assert model.num_features == 768 and model.num_classes == 0
    assert model.ecamp_cfg.modality == "fundus"
    assert model.patch_embed.patch_size == (16, 16)


def test_local_store_serves_unpublished_name(tmp_path):
    # What `ecamp convert` produces: a folder in the local store, found by name, offline.
    store = local_store_path("vit_base_patch16_224.ecamp_mimic_cxr")
    ecamp.save_pretrained(make_tiny_encoder(seed=4), store)
    try:
        model = ecamp.load("cxr-vit-b", local_files_only=True)
        with torch.no_grad():
            assert torch.equal(model(_x()), make_tiny_encoder(seed=4)(_x()))
        assert ecamp.get_transform(model).grayscale
    finally:
        import shutil

        shutil.rmtree(store)


def test_device_and_dtype(tiny_folder):
    model = ecamp.load(f"local-dir:{tiny_folder}", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(_x().bfloat16()).dtype == torch.bfloat16


def test_save_pretrained_writes_card_and_returns_entry(tmp_path):
    entry = ecamp.save_pretrained(make_tiny_encoder(), tmp_path / "out", name="tiny-cxr", hf_repo="org/tiny")
    files = {f["path"]: f for f in entry["files"]}
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    from ecamp.fileio import sha256_file

    for name, f in files.items():
        assert sha256_file(tmp_path / "out" / name) == f["sha256"]
        assert (tmp_path / "out" / name).stat().st_size == f["size"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["num_classes"] == 0
    assert config["model_args"]["global_pool"] == "avg" and config["model_args"]["fc_norm"] is False
    assert config["ecamp"]["modality"] == "cxr" and "ecamp" not in config["pretrained_cfg"]
    assert config["pretrained_cfg"]["hf_hub_id"] == "org/tiny"
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "hf-hub:org/tiny" in card
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"


def test_save_pretrained_refuses_unrebuildable_model(tmp_path):
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=0, embed_dim=48, depth=2, num_heads=3,
                              img_size=64)
    model._model_args = {}  # e.g. a model assembled by hand: its constructor arguments are unknown
    with pytest.raises(EcampError, match="model_args"):
        ecamp.save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x" / "config.json").exists()
    ecamp.save_pretrained(model, tmp_path / "x", model_args={"embed_dim": 48, "depth": 2, "num_heads": 3,
                                                            "img_size": 64})
    assert ecamp.load(f"local-dir:{tmp_path / 'x'}").num_features == 48


def test_library_never_calls_cuda_or_imports_train():
    for path in (ROOT / "ecamp").rglob("*.py"):
        text = path.read_text()
        assert ".cuda(" not in text, path
        rel = path.relative_to(ROOT / "ecamp")
        # the library never reaches into ecamp.train; the CLI (argument parsing only) is the one entry layer
        if "train" not in rel.parts and rel.name != "cli.py":
            assert "ecamp.train" not in text and "from .train" not in text and "from ..train" not in text, path
