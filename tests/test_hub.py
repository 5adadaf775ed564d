"""ecamp.load against the loopback Hub with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecamp
from ecamp.errors import (
    ChecksumMismatchError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
)

from helpers.builders import folder_files, make_tiny_encoder, write_manifest


def _x(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 64, 64, generator=g)


def _reference_output() -> torch.Tensor:
    with torch.no_grad():
        return make_tiny_encoder()(_x())


def test_first_download_verifies_and_matches_original(published, hub):
    model = ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(_x()), _reference_output())
    got = [(r.method, r.path) for r in hub.requests]
    assert ("HEAD", f"/{published.repo}/resolve/{published.sha}/config.json") in got
    assert ("GET", f"/{published.repo}/resolve/{published.sha}/config.json") in got
    assert ("HEAD", f"/{published.repo}/resolve/{published.sha}/model.safetensors") in got
    # weights come from the "CDN" (a cross-origin redirect), as on the real Hub
    if hub.cdn_redirect:
        assert any(r.path.startswith("/cdn/") for r in hub.downloads())
    assert model.ecamp_cfg.modality == "cxr"
    assert model.pretrained_cfg["mean"] == pytest.approx([0.4722] * 3)


def test_pinned_commit_in_cache_makes_no_request(published, hub):
    ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    hub.clear_log()
    ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    assert hub.requests == []


def test_branch_revision_cache_hit_downloads_nothing(published, hub):
    ecamp.load(f"hf-hub:{published.repo}", cache_dir=published.cache)
    assert hub.downloads()
    hub.clear_log()
    model = ecamp.load(f"hf-hub:{published.repo}@main", cache_dir=published.cache)
    assert hub.downloads() == []
    assert {r.method for r in hub.requests} == {"HEAD"}
    with torch.no_grad():
        assert torch.equal(model(_x()), _reference_output())


def test_new_commit_on_branch_is_fetched_but_pinned_manifest_is_not(published, hub, tmp_path):
    ecamp.load(f"hf-hub:{published.repo}", cache_dir=published.cache)
    other = folder_files(_save(make_tiny_encoder(seed=7), tmp_path / "v2"))
    new_sha = hub.commit(published.repo, other)
    moved = ecamp.load(f"hf-hub:{published.repo}", cache_dir=published.cache)
    with torch.no_grad():
        assert torch.equal(moved(_x()), make_tiny_encoder(seed=7)(_x()))
        # the manifest still pins the first commit and gets the first weights
        pinned = ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
        assert torch.equal(pinned(_x()), _reference_output())
        old = ecamp.load(f"hf-hub:{published.repo}@{published.sha}", cache_dir=published.cache)
        assert torch.equal(old(_x()), _reference_output())
    assert new_sha != published.sha


def _save(model, folder: Path) -> Path:
    ecamp.save_pretrained(model, folder)
    return folder


def test_offline_monkeypatched_uses_cache_and_reports_missing(published, hub, monkeypatch):
    from huggingface_hub import constants

    ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    ecamp.load(f"hf-hub:{published.repo}", cache_dir=published.cache)
    hub.clear_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    ecamp.load(f"hf-hub:{published.repo}", cache_dir=published.cache)  # branch name resolved from the cache
    assert hub.requests == []
    with pytest.raises(NotCachedError) as err:
        ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache.parent / "empty")
    assert "ecamp download tiny-cxr" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert hub.requests == []


def test_local_files_only_not_cached(published):
    with pytest.raises(NotCachedError, match="ecamp download"):
        ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache, local_files_only=True)


def test_hf_hub_offline_env_in_fresh_process(published, hub):
    ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    hub.clear_log()
    code = (
        "import ecamp, torch; "
        f"m = ecamp.load('tiny-cxr', manifest={str(published.manifest)!r}, cache_dir={str(published.cache)!r}); "
        "print(tuple(m(torch.zeros(1, 3, 64, 64)).shape)); "
        "from ecamp.errors import NotCachedError\n"
        "try:\n"
        f"    ecamp.load('tiny-cxr', manifest={str(published.manifest)!r}, cache_dir={str(published.cache)!r} + '-x')\n"
        "except NotCachedError as e:\n"
        "    print('NOT-CACHED', 'ecamp download tiny-cxr' in str(e))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(1, 48)" in out.stdout
    assert "NOT-CACHED True" in out.stdout
    assert hub.requests == []


def test_unknown_repo_revision_and_file(published, hub):
    with pytest.raises(RepoNotFoundError, match="does not exist"):
        ecamp.load("hf-hub:ecamp-test/no-such-repo", cache_dir=published.cache)
    with pytest.raises(RevisionNotFoundError, match="no-such-branch"):
        ecamp.load(f"hf-hub:{published.repo}@no-such-branch", cache_dir=published.cache)
    hub.commit("ecamp-test/config-only", {"config.json": published.files["config.json"]})
    with pytest.raises(RemoteFileNotFoundError, match="model.safetensors"):
        ecamp.load("hf-hub:ecamp-test/config-only", cache_dir=published.cache)
    # a manifest pinning a commit the Hub does not have
    bad = write_manifest(published.manifest.parent / "bad.json", published.repo, "0" * 40, published.files)
    with pytest.raises(RevisionNotFoundError):
        ecamp.load("tiny-cxr", manifest=bad, cache_dir=published.cache)


def test_tampered_cached_blob_is_refused_then_repaired(published, tmp_path):
    ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    weights = ecamp.download(published.alias, manifest=published.manifest, cache_dir=published.cache)
    blob = Path(os.path.realpath(weights["model.safetensors"]))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: the Hub client's size check cannot see it
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as err:
        ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    assert "model.safetensors" in str(err.value) and "--force" in str(err.value)
    ecamp.download(published.alias, manifest=published.manifest, cache_dir=published.cache, force_download=True)
    model = ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    with torch.no_grad():
        assert torch.equal(model(_x()), _reference_output())


def test_mirror_serving_other_bytes_is_refused(published, hub, tmp_path):
    # A mirror (or a compromised repo) serves different weights under the pinned name: sha256 catches it.
    tampered = dict(published.files)
    evil = folder_files(_save(make_tiny_encoder(seed=3), tmp_path / "evil"))
    tampered["model.safetensors"] = evil["model.safetensors"]
    sha = hub.commit("ecamp-test/mirror", tampered)
    manifest = write_manifest(tmp_path / "m.json", "ecamp-test/mirror", sha, published.files)
    with pytest.raises(ChecksumMismatchError, match="tampered"):
        ecamp.load("tiny-cxr", manifest=manifest, cache_dir=published.cache)


def test_timm_loads_the_exported_repo_identically(published):
    import timm

    ours = ecamp.load(published.alias, manifest=published.manifest, cache_dir=published.cache)
    theirs = timm.create_model(f"hf-hub:{published.repo}", pretrained=True).eval()
    assert type(theirs) is type(ours)
    x = _x()
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
        assert torch.equal(theirs.forward_features(x), ours.forward_features(x))
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_verify_cli_reports_ok_then_mismatch(published):
    ecamp.download(published.alias, manifest=published.manifest, cache_dir=published.cache)
    cmd = [sys.executable, "-m", "ecamp", "verify", "tiny-cxr", "--manifest", str(published.manifest),
           "--cache-dir", str(published.cache)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok ") == 3
    results = ecamp.verify("tiny-cxr", manifest=published.manifest, cache_dir=published.cache)
    cfg = Path(os.path.realpath(next(r.path for r in results if r.file == "config.json")))
    cfg.write_text(cfg.read_text().replace('"avg"', '"token"'))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "mismatch" in bad.stdout and "config.json" in bad.stdout


def test_download_cli_prints_paths(published):
    out = subprocess.run([sys.executable, "-m", "ecamp", "download", "tiny-cxr", "--manifest", str(published.manifest),
                          "--cache-dir", str(published.cache)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("\t") for line in out.stdout.strip().splitlines())
    assert set(lines) == {"config.json", "model.safetensors", "README.md"}
    assert all(Path(p).is_file() for p in lines.values())
    assert json.loads(Path(lines["config.json"]).read_text())["architecture"] == "vit_base_patch16_224"


def test_ecamp_manifest_env_var(published, monkeypatch):
    monkeypatch.setenv("ECAMP_MANIFEST", str(published.manifest))
    assert "tiny-cxr" in ecamp.list_models()
    model = ecamp.load("tiny-cxr", cache_dir=published.cache)
    assert model.num_features == 48
