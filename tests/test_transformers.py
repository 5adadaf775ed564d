"""Every ecamp export loads in transformers' auto classes and in timm's ``hf-hub:`` loader with identical outputs,
over the loopback Hub with the real clients."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import ecamp

from helpers.builders import folder_files, make_tiny_encoder


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _publish(hub, repo: str, folder) -> str:
    hub.commit(repo, folder_files(folder))
    return repo


def _check_feature_model(repo: str, cache) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

    ours = ecamp.load(f"hf-hub:{repo}", cache_dir=cache)
    x = _x()
    theirs = AutoModel.from_pretrained(repo, cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(theirs(x).pooler_output, ours(x))
        head = AutoModelForImageClassification.from_pretrained(repo, num_labels=3, cache_dir=cache).eval()
        assert head(x).logits.shape == (2, 3)
        assert torch.equal(head.timm_model.forward_features(x), ours.forward_features(x))
    processor = AutoImageProcessor.from_pretrained(repo, cache_dir=cache)
    cfg = ours.pretrained_cfg
    assert processor.data_config["mean"] == pytest.approx(tuple(cfg["mean"]))
    assert processor.data_config["std"] == pytest.approx(tuple(cfg["std"]))
    assert tuple(processor.data_config["input_size"]) == tuple(cfg["input_size"])
    import timm

    with torch.no_grad():
        assert torch.equal(timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()(x), ours(x))


def test_encoder_export_loads_in_every_auto_class(hub, tmp_path):
    ecamp.save_pretrained(make_tiny_encoder(), tmp_path / "enc", name="tiny-cxr")
    assert "num_classes" not in json.loads((tmp_path / "enc" / "config.json").read_text())["model_args"]
    _check_feature_model(_publish(hub, "ecamp-test/hf-encoder", tmp_path / "enc"), tmp_path / "cache")


def test_converted_authors_weights_load_in_every_auto_class(hub, tmp_path):
    from ecamp.convert import convert
    from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel

    cfg = ECAMPPretrainConfig.tiny()
    torch.manual_seed(0)
    state = ECAMPPretrainModel(cfg).to_authors_state_dict()
    torch.save({"model": state, "args": argparse.Namespace(epochs=1)}, tmp_path / "ckpt.pth")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    convert(tmp_path / "ckpt.pth", "cxr-vit-b", out=tmp_path / "conv", config=tmp_path / "cfg.json")
    repo = _publish(hub, "ecamp-test/hf-converted", tmp_path / "conv")
    ours = ecamp.load(f"hf-hub:{repo}", cache_dir=tmp_path / "cache")
    assert ours.pretrained_cfg["input_size"] == [3, cfg.img_size, cfg.img_size]
    from transformers import AutoModel

    theirs = AutoModel.from_pretrained(repo, cache_dir=tmp_path / "cache").eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(theirs(x).pooler_output, ours(x))


def test_fine_tuned_classifier_keeps_its_labels_everywhere(hub, tmp_path, tiny_folder):
    from transformers import AutoModelForImageClassification

    clf = ecamp.load(f"local-dir:{tiny_folder}", num_classes=3)
    torch.manual_seed(1)
    torch.nn.init.normal_(clf.head.weight)
    labels = ["effusion", "nodule", "pneumothorax"]
    ecamp.save_pretrained(clf, tmp_path / "clf", label_names=labels)
    with pytest.raises(ecamp.errors.InvalidArgumentError, match="one name per output"):
        ecamp.save_pretrained(clf, tmp_path / "bad", label_names=labels[:2])
    repo = _publish(hub, "ecamp-test/hf-classifier", tmp_path / "clf")
    ours = ecamp.load(f"hf-hub:{repo}", cache_dir=tmp_path / "cache")
    assert ours.num_classes == 3 and ours.pretrained_cfg["label_names"] == labels
    theirs = AutoModelForImageClassification.from_pretrained(repo, cache_dir=tmp_path / "cache").eval()
    assert theirs.config.id2label == dict(enumerate(labels))
    x = _x()
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, ours(x))
    import timm

    with torch.no_grad():
        assert torch.equal(timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()(x), ours(x))
