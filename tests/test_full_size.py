"""Full-size ViT-B/16 round trip through the loopback Hub (slow: about 350 MB of weights)."""

from __future__ import annotations

import pytest
import torch

import ecamp

from helpers.builders import folder_files, write_manifest

pytestmark = pytest.mark.slow


def test_vit_b_export_publish_load_and_timm(hub, tmp_path):
    import timm

    model = ecamp.load("cxr-vit-b", pretrained=False)
    entry = ecamp.save_pretrained(model, tmp_path / "export", name="cxr-vit-b")
    files = folder_files(tmp_path / "export")
    sha = hub.commit("ecamp-test/vit-b", files)
    manifest = write_manifest(tmp_path / "m.json", "ecamp-test/vit-b", sha, files, alias="big-cxr")
    loaded = ecamp.load("big-cxr", manifest=manifest, cache_dir=tmp_path / "cache")
    theirs = timm.create_model("hf-hub:ecamp-test/vit-b", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (1, 768)
        assert torch.equal(loaded(x), ref) and torch.equal(theirs(x), ref)
    assert {f["path"] for f in entry["files"]} == {"config.json", "model.safetensors", "README.md"}
