"""What may be published: a pre-training folder (its text side saw credentialed reports) is refused for a public
push with nothing sent, and pushed gated through the Hub's repo-settings call; model cards carry the licence
link, its NOTICE file, the scope sections and the paper's DOI."""

from __future__ import annotations

import json

import pytest
import torch

import ecamp
from ecamp.cli import main
from ecamp.config import EcampCfg
from ecamp.errors import RestrictedDataError

from helpers.builders import make_tiny_encoder
from helpers.loopback_hub import WRITE_TOKEN


def _pretrain_folder(tmp_path, seed: int):
    from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel

    torch.manual_seed(seed)
    model = ECAMPPretrainModel(ECAMPPretrainConfig.tiny())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights of their own: the Hub skips objects it already holds
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.ecamp_cfg = EcampCfg(modality="cxr", image_policy="mimic-cxr-jpg", grayscale=True)
    folder = tmp_path / "pretrain"
    ecamp.save_pretrained(model, folder, name="cxr-ecamp-b-pretrain")
    return folder


def test_public_push_of_a_pretraining_folder_is_refused_before_any_request(hub, tmp_path, capsys):
    folder = _pretrain_folder(tmp_path, 8101)
    before = sorted(p.name for p in folder.iterdir())
    hub.clear_log()
    with pytest.raises(RestrictedDataError, match="PhysioNet Credentialed Health Data License") as err:
        ecamp.push(folder, "ecamp-guard/public", token=WRITE_TOKEN)
    assert "MIMIC-CXR" in str(err.value) and "--gated" in str(err.value) and isinstance(err.value, PermissionError)
    assert hub.requests == [] and "ecamp-guard/public" not in hub.repos
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written either
    # the command says the same in one line and fails
    assert main(["push", str(folder), "--repo", "ecamp-guard/public", "--token", WRITE_TOKEN]) != 0
    assert "PhysioNet" in capsys.readouterr().err and hub.requests == []


def test_gated_push_of_a_pretraining_folder(hub, tmp_path, capsys):
    from huggingface_hub import HfApi, ModelCard

    folder = _pretrain_folder(tmp_path, 8102)
    manifest = tmp_path / "m.json"
    assert main(["push", str(folder), "--repo", "ecamp-guard/gated", "--token", WRITE_TOKEN, "--gated", "manual",
                 "--name", "tiny-pretrain-gated", "--manifest-out", str(manifest)]) == 0
    out = json.loads(capsys.readouterr().out)
    repo = hub.repos["ecamp-guard/gated"]
    assert repo.gated == "manual" and not repo.private and out["gated"] == "manual"
    # the settings call came before the first upload
    paths = [r.path for r in hub.requests]
    settings = paths.index("/api/models/ecamp-guard/gated/settings")
    assert all(settings < i for i, p in enumerate(paths) if "/preupload/" in p or "/commit/" in p)
    info = HfApi(endpoint=hub.url, token=WRITE_TOKEN).model_info("ecamp-guard/gated")
    assert info.gated == "manual"
    files = repo.commits[out["revision"]]
    assert "NOTICE" in files and b"PhysioNet" in files["NOTICE"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "other" and card.data.license_link == "NOTICE"
    assert "no contrastive head" in card.text
    loaded = ecamp.load_pretrain("tiny-pretrain-gated", manifest=manifest, cache_dir=tmp_path / "cache")
    assert loaded.ecamp_cfg.source == "tiny-pretrain-gated"


def test_private_push_is_allowed_and_made_private(hub, tmp_path):
    folder = _pretrain_folder(tmp_path, 8103)
    out = ecamp.push(folder, "ecamp-guard/private", token=WRITE_TOKEN, private=True)
    assert hub.repos["ecamp-guard/private"].private and out["private"]


def test_an_encoder_pushes_publicly_and_bad_gated_is_refused(hub, tmp_path):
    folder = tmp_path / "enc"
    ecamp.save_pretrained(make_tiny_encoder(seed=8104), folder, name="tiny-guard")
    with pytest.raises(ecamp.errors.InvalidArgumentError, match="--gated"):
        ecamp.push(folder, "ecamp-guard/enc", token=WRITE_TOKEN, gated="yes")
    out = ecamp.push(folder, "ecamp-guard/enc", token=WRITE_TOKEN)
    assert hub.repos["ecamp-guard/enc"].gated is False and not hub.repos["ecamp-guard/enc"].private
    assert out["gated"] is False and (folder / "NOTICE").is_file()


@pytest.mark.parametrize("kind", ["encoder", "classifier", "segmentation", "detection", "pretrain"])
def test_every_card_parses_with_its_sections(tmp_path, kind):
    from huggingface_hub import ModelCard

    from ecamp.models.heads import DetectionModel, SegmentationModel

    if kind == "pretrain":
        folder = _pretrain_folder(tmp_path, 8105)
    else:
        enc = make_tiny_encoder(3)
        model = {"encoder": lambda: enc, "classifier": lambda: (enc.reset_classifier(2), enc)[1],
                 "segmentation": lambda: SegmentationModel(enc, 1, (16, 8)),
                 "detection": lambda: DetectionModel(enc, 1, 4, (16, 32, 64), 32)}[kind]()
        folder = tmp_path / kind
        ecamp.save_pretrained(model, folder, name="cxr-vit-b" if kind == "encoder" else None)
    card = ModelCard.load(folder / "README.md")
    for section in ("## Intended use", "## Out-of-scope use", "## Limitations", "## Licence"):
        assert section in card.text, section
    assert "https://doi.org/10.1016/j.media.2025.103690" in card.text
    assert card.data.license == "other" and card.data.license_link == "NOTICE"
    assert ("no contrastive head" in card.text) == (kind == "pretrain")
