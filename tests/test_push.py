"""`ecamp push` against the loopback Hub with the real huggingface_hub client, and model cards as ModelCard."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import ecamp
from ecamp.cli import main
from ecamp.errors import HubConnectionError, HubPermissionError, ModelFolderError, RepoNotFoundError

from helpers.builders import folder_files, make_tiny_encoder, write_manifest
from helpers.loopback_hub import WRITE_TOKEN

UPLOAD_ROUTES = ("/preupload/", ".git/info/lfs/objects/batch", "/lfs-upload/", ".git/info/lfs/objects/verify",
                 "/commit/")


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _push_cli(folder: Path, repo: str, capsys, *extra: str) -> dict:
    assert main(["push", str(folder), "--repo", repo, "--token", WRITE_TOKEN, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _card(repo: str, revision: str, cache: Path):
    from huggingface_hub import ModelCard, hf_hub_download

    return ModelCard.load(hf_hub_download(repo, "README.md", revision=revision, cache_dir=cache))


def test_push_then_load_pinned_and_verified(hub, tmp_path, capsys, monkeypatch):
    # weights of their own: the Hub (and the loopback one) skips the upload of LFS objects it already holds
    tiny_folder = tmp_path / "enc"
    ecamp.save_pretrained(make_tiny_encoder(seed=9173), tiny_folder, name="tiny-cxr", hf_repo="ecamp-push/e2e")
    manifest = tmp_path / "my_manifest.json"
    out = _push_cli(tiny_folder, "ecamp-push/e2e", capsys, "--name", "tiny.pushed", "--manifest-out", str(manifest))
    commit = out["revision"]
    assert hub.repos["ecamp-push/e2e"].refs["main"] == commit
    posted = [r.path for r in hub.writes()]
    for route in UPLOAD_ROUTES:  # the whole LFS protocol ran, weights through a pre-signed PUT
        assert any(route in p for p in posted), route
    assert hub.repos["ecamp-push/e2e"].commits[commit]["model.safetensors"] == \
        (tiny_folder / "model.safetensors").read_bytes()

    entry = json.loads(manifest.read_text())["models"]["tiny.pushed"]
    assert entry["published"] is True and entry["revision"] == commit and entry["hf_repo"] == "ecamp-push/e2e"
    assert {f["path"]: (f["sha256"], f["size"]) for f in entry["files"]} == {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in tiny_folder.iterdir()}
    assert out["entry"] == entry and out["manifest"] == str(manifest)

    hub.clear_log()
    model = ecamp.load("tiny.pushed", manifest=manifest, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        assert torch.equal(model(_x()), make_tiny_encoder(seed=9173)(_x()))
    resolved = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert {p.rsplit("/", 1)[1] for p in resolved} == {"config.json", "model.safetensors"}
    assert all(p.startswith(f"/ecamp-push/e2e/resolve/{commit}/") for p in resolved)

    monkeypatch.setenv("ECAMP_MANIFEST", str(manifest))  # the README's recipe; the cache answers, pinned
    hub.clear_log()
    assert ecamp.load("tiny.pushed", cache_dir=tmp_path / "cache").num_features == 48
    assert hub.requests == []


def test_pushed_card_parses_and_says_what_the_hub_filters_on(hub, tmp_path, capsys):
    folder = tmp_path / "enc"
    ecamp.save_pretrained(make_tiny_encoder(seed=2), folder, name="tiny-card", hf_repo="ecamp-push/card")
    out = _push_cli(folder, "ecamp-push/card", capsys)
    assert out["name"] == "tiny-card"
    card = _card("ecamp-push/card", out["revision"], tmp_path / "cache")
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-feature-extraction"
    assert {"ecamp", "medical", "chest-x-ray", "image-feature-extraction"} <= set(card.data.tags)
    assert card.data.license == "other" and card.data.base_model is None
    assert 'ecamp.load("hf-hub:ecamp-push/card")' in card.text and "## Preprocessing" in card.text
    assert "doi = {10.1016/j.media.2025.103690}" in card.text  # the manifest's paper, as BibTeX


def test_classifier_of_a_published_entry_names_its_base_model(hub, published, tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("ECAMP_MANIFEST", str(published.manifest))
    clf = ecamp.load(published.alias, num_classes=3, cache_dir=published.cache)
    torch.nn.init.normal_(clf.head.weight, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "clf"
    entry = ecamp.save_pretrained(clf, folder, name="tiny-clf", hf_repo="ecamp-push/clf",
                                  label_names=["effusion", "nodule", "pneumothorax"])
    assert entry["aliases"] == [] and entry["metrics"] == [] and "derived from tiny.ecamp_test" in entry["description"]
    assert json.loads((folder / "config.json").read_text())["ecamp"]["derived_from"] == published.name
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-classification" and "image-classification" in card.data.tags
    assert card.data.base_model == published.repo and card.data.datasets == ["mimic-cxr"]
    assert "effusion, nodule, pneumothorax" in card.text

    manifest = tmp_path / "m.json"
    out = _push_cli(folder, "ecamp-push/clf", capsys, "--manifest-out", str(manifest))  # the Hub accepts base_model
    pushed = json.loads(manifest.read_text())["models"]["tiny-clf"]
    assert pushed["pretrained_cfg"]["num_classes"] == 3
    assert pushed["provenance"]["notes"] == f"Derived from {published.name} ({published.repo})."
    loaded = ecamp.load("tiny-clf", manifest=manifest, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        assert torch.equal(loaded(_x()), clf(_x()))
    assert _card("ecamp-push/clf", out["revision"], tmp_path / "cache").data.base_model == published.repo


def test_citation_and_metrics_come_from_the_manifest_entry(tiny_folder, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    path = write_manifest(tmp_path / "m.json", "ecamp-push/unused", "a" * 40, folder_files(tiny_folder),
                          alias="tiny-metrics")
    data = json.loads(path.read_text())
    data["models"]["tiny.ecamp_test"]["metrics"] = [
        {"task": "CheXpert 5x200 linear probe", "metric": "auroc", "value": 0.871, "source": "Table 2",
         "split": "test"}]
    data["models"]["tiny.ecamp_test"]["provenance"]["paper"]["doi"] = "10.0000/example.doi"
    path.write_text(json.dumps(data))
    model = make_tiny_encoder()
    monkeypatch.setenv("ECAMP_MANIFEST", str(path))
    entry = ecamp.save_pretrained(model, tmp_path / "out", name="tiny-metrics")
    assert entry["name"] == "tiny.ecamp_test" and entry["aliases"] == ["tiny-metrics"]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.metrics == ["auroc"]
    assert "| CheXpert 5x200 linear probe | auroc | 0.871 | test | Table 2 |" in card.text
    assert "doi = {10.0000/example.doi}" in card.text and "journal = {Medical Image Analysis}" in card.text


def test_failed_commit_records_nothing(hub, tiny_folder, tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "m.json"
    first = _push_cli(tiny_folder, "ecamp-push/fail", capsys, "--name", "tiny.first", "--manifest-out", str(manifest))
    before = manifest.read_bytes()
    folder = tmp_path / "second"
    ecamp.save_pretrained(make_tiny_encoder(seed=5), folder, name="tiny-second")
    monkeypatch.setattr(hub, "failing", {"commit"})
    hub.clear_log()
    rc = main(["push", str(folder), "--repo", "ecamp-push/fail", "--manifest-out", str(manifest), "--token",
               WRITE_TOKEN])
    err = capsys.readouterr().err
    assert rc == 2 and "ecamp push: error:" in err and "Nothing was recorded" in err and "Traceback" not in err
    assert any("/lfs-upload/" in r.path for r in hub.writes())  # it failed half-way: after the weights went up
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "second"]  # no temporary manifest left
    assert hub.repos["ecamp-push/fail"].refs["main"] == first["revision"]
    with pytest.raises(HubConnectionError):
        ecamp.push(folder, "ecamp-push/fail", token=WRITE_TOKEN, manifest=tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists()


def _plain_timm_folder(folder: Path) -> None:
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=48, depth=2,
                                  num_heads=3, img_size=64), str(folder), safe_serialization=True)


@pytest.mark.parametrize("case", ["missing-weights", "symlink", "temporary-file", "not-ecamp", "no-folder"])
def test_a_folder_that_is_not_an_ecamp_folder_is_refused_before_any_request(hub, tiny_folder, tmp_path, case):
    folder = tmp_path / "f"
    if case == "not-ecamp":
        _plain_timm_folder(folder)
    elif case != "no-folder":
        shutil.copytree(tiny_folder, folder)
        if case == "missing-weights":
            (folder / "model.safetensors").unlink()
        elif case == "symlink":
            (folder / "extra.safetensors").symlink_to(folder / "model.safetensors")
        else:
            (folder / ".config.json.tmp-123").write_text("{}")
    hub.clear_log()
    with pytest.raises(ModelFolderError) as info:
        ecamp.push(folder, "ecamp-push/refused", token=WRITE_TOKEN, manifest=tmp_path / "m.json")
    assert info.value.path is not None and str(tmp_path) in info.value.path
    assert hub.requests == [] and "ecamp-push/refused" not in hub.repos
    assert not (tmp_path / "m.json").exists()


def test_no_token_is_refused_and_private_repos_stay_private(hub, tiny_folder, tmp_path, capsys):
    with pytest.raises(HubPermissionError, match="hf auth login"):
        ecamp.push(tiny_folder, "ecamp-push/anonymous", manifest=tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists() and "ecamp-push/anonymous" not in hub.repos

    manifest = tmp_path / "p.json"
    _push_cli(tiny_folder, "ecamp-push/private", capsys, "--private", "--name", "tiny.private", "--manifest-out",
              str(manifest))
    assert hub.repos["ecamp-push/private"].private
    with pytest.raises(RepoNotFoundError):  # anonymous downloads do not see it
        ecamp.load("tiny.private", manifest=manifest, cache_dir=tmp_path / "cache")
