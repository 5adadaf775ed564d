"""Every ecamp export loads in transformers' auto classes and in timm's ``hf-hub:`` loader with identical outputs,
over the loopback Hub with the real clients."""

from __future__ import annotations

import argparse
import json

import numpy as np
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


# -- transformers' pipelines ------------------------------------------------------------------------------------
def _grey_rgb_png(path, size: int = 64):
    """An 8-bit RGB PNG with equal channels at the model's input size: ecamp's reader (grey film, 8-bit as it is)
    and the pipeline's timm transform (no resize at this size) then give the same pixel values."""
    from PIL import Image

    grey = np.random.default_rng(5).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(path)
    return str(path)


@pytest.mark.parametrize(("activation", "problem_type"), [("sigmoid", "multi_label_classification"),
                                                          ("softmax", "single_label_classification")])
def test_image_classification_pipeline_gives_ecamps_probabilities(tiny_folder, tmp_path, activation, problem_type):
    from pydicom.data import get_testdata_file
    from transformers import pipeline

    from ecamp.predict import predict

    clf = ecamp.load(f"local-dir:{tiny_folder}", num_classes=3)
    torch.manual_seed(2)
    torch.nn.init.normal_(clf.head.weight)
    labels = ["effusion", "nodule", "pneumothorax"]
    ecamp.save_pretrained(clf, tmp_path / "clf", label_names=labels,
                          ecamp_cfg={"task": "classification", "activation": activation})
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["problem_type"] == problem_type
    assert config["id2label"] == {"0": "effusion", "1": "nodule", "2": "pneumothorax"}
    assert config["label2id"] == {"effusion": 0, "nodule": 1, "pneumothorax": 2}
    model = ecamp.load(f"local-dir:{tmp_path / 'clf'}")  # ecamp reads the folder as before
    assert model.label_names == labels and model.ecamp_cfg.activation == activation

    pipe = pipeline("image-classification", model=str(tmp_path / "clf"))
    assert pipe.model.config.problem_type == problem_type and pipe.model.config.id2label == dict(enumerate(labels))
    png = _grey_rgb_png(tmp_path / "film.png")
    ours = predict(model, [png], progress=False)[0]  # uncalibrated probabilities
    scores = {d["label"]: d["score"] for d in pipe(png, top_k=None)}
    np.testing.assert_allclose([scores[n] for n in labels], ours, rtol=0, atol=1e-5)
    assert (ours.sum() == pytest.approx(1.0, abs=1e-5)) == (activation == "softmax")

    # what the pipeline cannot read (a DICOM film): ecamp's tensors into the pipeline's model and postprocessing
    dicom = get_testdata_file("RG1_UNCR.dcm")
    x = ecamp.get_transform(model)(dicom)[None]
    with torch.no_grad():
        scores = {d["label"]: d["score"] for d in pipe.postprocess(pipe.model(pixel_values=x), top_k=3)}
    np.testing.assert_allclose([scores[n] for n in labels], predict(model, [dicom], progress=False)[0],
                               rtol=0, atol=1e-5)


def test_a_one_output_softmax_head_writes_no_problem_type(tiny_folder, tmp_path):
    clf = ecamp.load(f"local-dir:{tiny_folder}", num_classes=1)
    ecamp.save_pretrained(clf, tmp_path / "one", label_names=["finding"],
                          ecamp_cfg={"task": "classification", "activation": "softmax"})
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert "problem_type" not in config and config["id2label"] == {"0": "finding"}
    ecamp.save_pretrained(ecamp.load(f"local-dir:{tiny_folder}"), tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert not {"problem_type", "id2label", "label2id"} & set(config)  # an encoder has no classes


def test_image_feature_extraction_pipeline_gives_forward_features(tiny_folder, tmp_path):
    from transformers import pipeline

    encoder = ecamp.load(f"local-dir:{tiny_folder}")
    pipe = pipeline("image-feature-extraction", model=str(tiny_folder))
    png = _grey_rgb_png(tmp_path / "film.png")
    x = ecamp.get_transform(encoder)(png)[None]
    with torch.no_grad():
        tokens = pipe(png, return_tensors=True)
        assert tokens.shape == (1, 1 + 16, 48)  # the class token and 4x4 patches, 48 channels
        torch.testing.assert_close(tokens, encoder.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(pipe(png, return_tensors=True, pool=True), encoder(x), rtol=0, atol=1e-5)
