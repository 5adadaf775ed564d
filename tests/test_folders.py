"""Every kind of folder ecamp writes goes through one format: saved with ecamp.save_pretrained, pushed to the
loopback Hub with the real huggingface_hub client, and loaded back by its manifest name from a fresh cache."""

from __future__ import annotations

import json

import pytest
import torch

import ecamp
from ecamp.config import EcampCfg, ModelConfig
from ecamp.models.heads import DetectionModel, PyramidSegmentationModel, SegmentationModel

from helpers.builders import make_tiny_encoder
from helpers.loopback_hub import WRITE_TOKEN

KINDS = ("encoder", "authors", "classifier", "segmentation", "pyramid", "detection", "pretrain")
PIPELINE = {"encoder": "image-feature-extraction", "authors": "image-feature-extraction",
            "classifier": "image-classification", "segmentation": "image-segmentation",
            "pyramid": "image-segmentation", "detection": "object-detection", "pretrain": "image-feature-extraction"}


def _trained(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of their own (the Hub skips uploads of objects it already holds), not an initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _model(kind: str, tmp_path, seed: int):
    """The model of ``kind`` and the folder ecamp writes for it."""
    folder = tmp_path / kind
    if kind == "authors":  # the authors' release converted (`ecamp convert`), its sizes given as a config
        from ecamp.convert import convert
        from ecamp.models.pretrain import ECAMPPretrainConfig

        from helpers.smoke_wheel import authors_checkpoint

        cfg = ECAMPPretrainConfig.tiny()
        (tmp_path / "tiny.json").write_text(json.dumps(cfg.to_dict()))
        authors_checkpoint(tmp_path / "ECAMP_ViT_Base_16.pth", cfg)
        convert(tmp_path / "ECAMP_ViT_Base_16.pth", "cxr-vit-b", out=folder, config=tmp_path / "tiny.json")
        return ecamp.load(folder), folder
    if kind == "pretrain":
        from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel

        torch.manual_seed(seed)
        model = _trained(ECAMPPretrainModel(ECAMPPretrainConfig.tiny()), seed)
        model.ecamp_cfg = EcampCfg(modality="cxr", image_policy="mimic-cxr-jpg", grayscale=True)
    elif kind == "encoder":
        model = _trained(make_tiny_encoder(seed), seed)
    elif kind == "classifier":
        model = make_tiny_encoder(seed)
        model.reset_classifier(3)
        model = _trained(model, seed)
        model.ecamp_cfg = EcampCfg.from_dict(model.ecamp_cfg).replace(task="classification", activation="sigmoid")
    else:
        enc = make_tiny_encoder(seed)
        model = {"segmentation": lambda: SegmentationModel(enc, 2, (16, 8)),
                 "pyramid": lambda: PyramidSegmentationModel(enc, 1, 16),
                 "detection": lambda: DetectionModel(enc, 1, 4, (16, 32, 64), 32)}[kind]()
        model = _trained(model, seed)
    labels = {"classifier": ["effusion", "nodule", "pneumothorax"], "segmentation": ["disc", "cup"]}.get(kind)
    ecamp.save_pretrained(model, folder, label_names=labels)
    return model, folder


def _same(a: torch.nn.Module, b: torch.nn.Module, kind: str) -> None:
    if kind == "pretrain":
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        return
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    for u, v in zip([ya] if torch.is_tensor(ya) else ya, [yb] if torch.is_tensor(yb) else yb, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("kind", KINDS)
def test_every_folder_kind_pushes_and_loads_back_by_name(hub, tmp_path, kind):
    from huggingface_hub import ModelCard

    seed = 7100 + KINDS.index(kind)
    model, folder = _model(kind, tmp_path, seed)
    card = ModelCard.load(folder / "README.md")  # every kind has a model card
    assert card.data.pipeline_tag == PIPELINE[kind] and "ecamp" in card.data.tags
    repo = f"ecamp-folders/{kind}"
    manifest = tmp_path / "manifest.json"
    out = ecamp.push(folder, repo, name=f"tiny-{kind}", token=WRITE_TOKEN, manifest=manifest,
                     gated="manual" if kind == "pretrain" else None)  # its text side saw credentialed reports
    entry = json.loads(manifest.read_text())["models"][f"tiny-{kind}"]
    assert entry["revision"] == out["revision"] and entry["published"] is True
    assert {f["path"] for f in entry["files"]} >= {"config.json", "model.safetensors", "README.md"}

    cache = tmp_path / "fresh-cache"
    loader = ecamp.load_pretrain if kind == "pretrain" else ecamp.load
    loaded = loader(f"tiny-{kind}", manifest=manifest, cache_dir=cache)
    _same(model, loaded, kind)
    assert loaded.ecamp_cfg.source == f"tiny-{kind}" and loaded.ecamp_cfg.modality == "cxr"
    assert ModelConfig.read(folder / "config.json").kind == {"authors": "encoder", "classifier": "classification",
                                                             "pyramid": "segmentation"}.get(kind, kind)


def test_push_of_a_dense_folder_names_its_task_in_the_entry(hub, tmp_path, capsys):
    from ecamp.cli import main

    _, folder = _model("segmentation", tmp_path, 7200)
    manifest = tmp_path / "m.json"
    assert main(["push", str(folder), "--repo", "ecamp-folders/seg-cli", "--token", WRITE_TOKEN,
                 "--manifest-out", str(manifest)]) == 0
    name = json.loads(capsys.readouterr().out)["name"]
    entry = json.loads(manifest.read_text())["models"][name]
    assert entry["ecamp"]["task"] == "segmentation" and entry["pretrained_cfg"]["num_classes"] == 2
    assert entry["architecture"] == "vit_base_patch16_224"


def test_the_loaded_block_is_the_one_get_pretrained_cfg_gives(tiny_folder):
    name = f"local-dir:{tiny_folder}"
    assert ecamp.get_pretrained_cfg(name)["ecamp"] == ecamp.load(name).ecamp_cfg.to_dict(with_source=True)
    cfg = ecamp.get_pretrained_cfg("cxr-vit-b")["ecamp"]
    assert cfg["source"].startswith("cxr-vit-b") and cfg["name"] == "vit_base_patch16_224.ecamp_mimic_cxr"


def test_a_bare_folder_path_loads_like_local_dir(tiny_folder):
    a, b = ecamp.load(str(tiny_folder)), ecamp.load(f"local-dir:{tiny_folder}")
    assert torch.equal(a.pos_embed, b.pos_embed)


def test_verify_checks_folders_and_finds_a_truncated_one(tiny_folder, tmp_path):
    import shutil

    ok = ecamp.verify(f"local-dir:{tiny_folder}")
    assert [r.status for r in ok] == ["no-hash", "no-hash"] and not any(r.failed for r in ok)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    bad = ecamp.verify(str(broken))
    assert [r.status for r in bad] == ["mismatch"] and "safetensors" in bad[0].detail


def test_typed_block_round_trips_and_refuses_bad_values():
    from ecamp.errors import ConfigError

    block = {"modality": "fundus", "image_policy": "bits", "task": "segmentation", "future_key": [1, 2],
             "dense_input": {"resize": "nearest", "rgb": True}, "finetune": {"dataset": "riga"}}
    cfg = EcampCfg.from_dict(block)
    assert cfg.dense and cfg.dense_input.rgb and cfg.extra == {"future_key": [1, 2]}
    assert EcampCfg.from_dict(cfg.to_dict()) == cfg and cfg.to_dict() == {**block}
    for bad in ({"image_policy": "gamma"}, {"task": "captioning"}, {"grayscale": "yes"}, {"finetune": 3}):
        with pytest.raises(ConfigError):
            EcampCfg.from_dict(bad)


def test_a_folder_saved_again_unchanged_keeps_its_ecamp_block_byte_for_byte(tiny_folder, tmp_path):
    ecamp.save_pretrained(ecamp.load(tiny_folder), tmp_path / "again")
    before = json.loads((tiny_folder / "config.json").read_text())["ecamp"]
    after = json.loads((tmp_path / "again" / "config.json").read_text())["ecamp"]
    assert json.dumps(after) == json.dumps(before)  # same keys, same order, explicit defaults kept
    block = EcampCfg.from_dict({"modality": "fundus", "image_policy": "bits", "grayscale": True, "fov_crop": False})
    assert list(block.replace(provenance={"a": 1}, name="x").to_dict()) == [
        "modality", "image_policy", "grayscale", "fov_crop", "provenance", "name"]
    assert "name" not in block.replace(name="x").replace(name=None).to_dict()


def test_names_that_look_like_paths_are_folders(tmp_path):
    from ecamp.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match="not a folder"):
        ecamp.load(str(tmp_path / "runs" / "bset"))
    with pytest.raises(ModelFolderError, match="hf-hub:org/name"):
        ecamp.load("org/repo")
    with pytest.raises(ModelFolderError):  # an unknown ~user is a missing folder, not a crash
        ecamp.load("~no-such-user-anywhere/x")
    with pytest.raises(ecamp.errors.UnknownModelError):
        ecamp.load("x" * 5000)


def test_the_folders_own_keys_win_over_its_manifest_entry(tmp_path, monkeypatch):
    from ecamp.hub import local_store_path

    model = make_tiny_encoder(5)
    model.ecamp_cfg = EcampCfg.from_dict({"modality": "cxr", "image_policy": "minmax", "grayscale": False})
    monkeypatch.setenv("ECAMP_HOME", str(tmp_path / "home"))
    ecamp.save_pretrained(model, local_store_path("vit_base_patch16_224.ecamp_mimic_cxr"))
    loaded = ecamp.load("cxr-vit-b")  # unpublished: the local store serves it
    assert loaded.ecamp_cfg.grayscale is False and loaded.ecamp_cfg.image_policy == "minmax"
    assert loaded.ecamp_cfg.name == "vit_base_patch16_224.ecamp_mimic_cxr"
    assert ecamp.get_pretrained_cfg("cxr-vit-b")["input_size"] == [3, 224, 224]  # the manifest's, not the store's
