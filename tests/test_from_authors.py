"""`ecamp convert --from-authors NAME`: gdown fetches the manifest's link from a loopback Google Drive
(tests/helpers/drive_server.py, a real HTTP server; the Drive-host route also over TLS behind a loopback proxy), and the
download is converted into the local store exactly as `ecamp convert FILE` converts the same bytes."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ecamp
from ecamp.cli import main
from ecamp.convert import convert_from_authors
from ecamp.errors import DownloadError, InvalidWeightsFileError, MissingDependencyError, WeightsNotPublishedError
from ecamp.models.pretrain import ECAMPPretrainConfig

from helpers.drive_server import LoopbackDrive
from helpers.smoke_wheel import authors_checkpoint

CXR = "vit_base_patch16_224.ecamp_mimic_cxr"
FILE_ID = "1Tnj38eXDqKQAzuonaHeKhaWtpJFF7hwh"  # the packaged manifest's link
FILE = "ECAMP_ViT_Base_16.pth"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """A small authors'-format checkpoint (bytes), its config JSON and its ViT state dict."""
    folder = tmp_path_factory.mktemp("release")
    cfg = ECAMPPretrainConfig.tiny()
    vit = authors_checkpoint(folder / FILE, cfg)
    (folder / "tiny.json").write_text(json.dumps(cfg.to_dict()))
    return {"data": (folder / FILE).read_bytes(), "config": str(folder / "tiny.json"), "vit": vit}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private local store, no proxy but the one a test sets, and gdown's cookie jar out of the user's home."""
    home = tmp_path / "ecamp-home"
    monkeypatch.setenv("ECAMP_HOME", str(home))
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(importlib.import_module("gdown.download"), "DEFAULT_COOKIES_FILE",
                        str(tmp_path / "gdown-cookies.txt"))
    return home


@pytest.fixture
def drive():
    server = LoopbackDrive().start()
    yield server
    server.stop()


def _manifest(tmp_path: Path, url: str) -> str:
    """The packaged manifest with the CXR encoder's original_url pointing at ``url``."""
    data = json.loads((Path(ecamp.__file__).parent / "weights_manifest.json").read_text())
    data["models"][CXR]["provenance"]["original_url"] = url
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return str(path)


def _other_release(data: bytes) -> bytes:
    """The same checkpoint with one tensor changed: what a replaced release would look like."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    ckpt["model"]["norm.weight"] = ckpt["model"]["norm.weight"] + 1
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _provenance(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["ecamp"]["provenance"]


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_the_download_converts_into_the_store_as_convert_does(drive, release, home, tmp_path, capsys):
    drive.put(FILE_ID, FILE, release["data"])
    url = f"{drive.url}/uc?id={FILE_ID}&export=download"
    manifest = _manifest(tmp_path, url)
    assert main(["convert", "--from-authors", "cxr-vit-b", "--manifest", manifest,
                 "--config", release["config"]]) == 0
    out = capsys.readouterr()
    result, sha = json.loads(out.out), hashlib.sha256(release["data"]).hexdigest()
    store = home / "local" / CXR
    assert result["out"] == str(store) and result["original_sha256"] == sha and result["original_url"] == url
    assert f"sha256 {sha}" in out.err and "now finds these weights offline" in out.err
    prov = _provenance(store)
    assert (prov["original_sha256"], prov["original_url"], prov["original_file"]) == (sha, url, FILE)
    assert sorted(p.name for p in (home / "local").iterdir()) == [CXR]  # no temporary folder left behind

    seen = len(drive.requests)
    model = ecamp.load("cxr-vit-b", manifest=manifest, local_files_only=True)
    assert len(drive.requests) == seen
    state = model.state_dict()
    assert set(state) == set(release["vit"]) and all(torch.equal(state[k], release["vit"][k]) for k in state)
    # `ecamp convert FILE` of the same bytes writes the same weights
    (tmp_path / FILE).write_bytes(release["data"])
    ref = tmp_path / "by-hand"
    assert main(["convert", str(tmp_path / FILE), "--name", "cxr-vit-b", "--out", str(ref),
                 "--config", release["config"]]) == 0
    assert json.loads(capsys.readouterr().out)["original_sha256"] == sha
    assert (ref / "model.safetensors").read_bytes() == (store / "model.safetensors").read_bytes()
    with torch.no_grad():
        assert torch.equal(model(_x()), ecamp.load(f"local-dir:{ref}")(_x()))


def test_a_cut_off_download_leaves_nothing_and_a_retry_works(drive, release, home, tmp_path, capsys):
    drive.put(FILE_ID, FILE, release["data"])
    url = f"{drive.url}/uc?id={FILE_ID}&export=download"
    manifest = _manifest(tmp_path, url)
    argv = ["convert", "--from-authors", "cxr-vit-b", "--manifest", manifest, "--config", release["config"]]
    drive.cut = 100  # every response, including gdown's retries, stops half-way
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was cut off" in err and url in err and "Retry" in err and "Traceback" not in err
    assert list((home / "local").iterdir()) == []  # neither the store folder nor a temporary file
    assert sum(path.startswith("/download") for _h, _m, path in drive.requests) > 1  # gdown did retry
    drive.cut = 0
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["original_sha256"] == hashlib.sha256(release["data"]).hexdigest()
    assert sorted(p.name for p in (home / "local").iterdir()) == [CXR]


def test_one_broken_transfer_is_resumed_within_the_call(drive, release, home, tmp_path):
    drive.put(FILE_ID, FILE, release["data"])
    manifest = _manifest(tmp_path, f"{drive.url}/uc?id={FILE_ID}&export=download")
    drive.cut = 1
    result = convert_from_authors("cxr-vit-b", manifest=manifest, config=release["config"], retries=1,
                                  progress=False)
    assert drive.cut == 0 and result["original_sha256"] == hashlib.sha256(release["data"]).hexdigest()
    with pytest.raises(DownloadError, match="was cut off"):
        drive.cut = 100
        convert_from_authors("cxr-vit-b", manifest=manifest, config=release["config"], retries=0, progress=False)
    assert _provenance(home / "local" / CXR)["original_sha256"] == result["original_sha256"]


def test_a_web_page_or_junk_instead_of_the_checkpoint_is_refused(drive, release, home, tmp_path, capsys):
    drive.put(FILE_ID, FILE, release["data"])
    viewer = f"{drive.url}/file/d/{FILE_ID}/view"  # a viewer link on a host gdown does not treat as Drive
    with pytest.raises(DownloadError, match="sent an HTML page") as err:
        convert_from_authors("cxr-vit-b", manifest=_manifest(tmp_path, viewer), config=release["config"],
                             progress=False)
    assert err.value.path == viewer and "Retry" in str(err.value) and "ecamp convert ECAMP_ViT_Base_16.pth" in str(
        err.value)
    drive.put("junk", FILE, b"\x00\x01 not a checkpoint " * 50)
    junk = f"{drive.url}/uc?id=junk&export=download"
    assert main(["convert", "--from-authors", "cxr-vit-b", "--manifest", _manifest(tmp_path, junk),
                 "--config", release["config"]]) == 2
    msg = capsys.readouterr().err
    assert "not a readable PyTorch checkpoint" in msg and junk in msg and "Retry" in msg
    assert "weights_only` set to `False`" not in msg  # torch's advice does not fit a download
    assert list((home / "local").iterdir()) == []
    with pytest.raises(InvalidWeightsFileError, match=re.escape(junk)):
        convert_from_authors("cxr-vit-b", manifest=_manifest(tmp_path, junk), progress=False)


def test_other_bytes_are_refused_unless_forced(drive, release, home, tmp_path, capsys):
    drive.put(FILE_ID, FILE, release["data"])
    manifest = _manifest(tmp_path, f"{drive.url}/uc?id={FILE_ID}&export=download")
    argv = ["convert", "--from-authors", "cxr-vit-b", "--manifest", manifest, "--config", release["config"]]
    assert main(argv) == 0
    store = home / "local" / CXR
    first = {p.name: p.read_bytes() for p in store.iterdir()}
    changed = _other_release(release["data"])
    drive.put(FILE_ID, FILE, changed)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    old, new = hashlib.sha256(release["data"]).hexdigest(), hashlib.sha256(changed).hexdigest()
    assert old in err and new in err and "--force" in err
    assert {p.name: p.read_bytes() for p in store.iterdir()} == first
    assert main([*argv, "--force"]) == 0
    assert _provenance(store)["original_sha256"] == new
    model = ecamp.load("cxr-vit-b", manifest=manifest, local_files_only=True)
    assert torch.equal(model.norm.weight, release["vit"]["norm.weight"] + 1)
    assert sorted(p.name for p in (home / "local").iterdir()) == [CXR]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the Drive-host route needs openssl for its certificate")
def test_drives_confirmation_page_is_followed_for_the_packaged_link(drive, release, home, tmp_path, monkeypatch,
                                                                    capsys):
    # The packaged manifest's https://drive.google.com link, unchanged: gdown's own Drive code path, answered by the
    # loopback server through the proxy (it serves only the Drive hosts and connects nowhere).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(drive.enable_tls(tmp_path)))
    monkeypatch.setenv("https_proxy", drive.url)
    drive.put(FILE_ID, FILE, release["data"], large=True)
    argv = ["convert", "--from-authors", "cxr-vit-b", "--config", release["config"]]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["original_sha256"] == hashlib.sha256(release["data"]).hexdigest()
    gets = [(host, path) for host, method, path in drive.requests if method == "GET"]
    assert gets[0] == ("drive.google.com", f"/uc?id={FILE_ID}")
    assert gets[1] == ("drive.usercontent.google.com", f"/download?id={FILE_ID}&export=download")
    assert gets[2][0] == "drive.usercontent.google.com" and "confirm=t" in gets[2][1] and "uuid=" in gets[2][1]
    assert {host for host, method, _ in drive.requests if method == "CONNECT"} == {"drive.google.com",
                                                                                    "drive.usercontent.google.com"}
    model = ecamp.load("cxr-vit-b", local_files_only=True)
    assert torch.equal(model.norm.weight, release["vit"]["norm.weight"])

    drive.quota = True  # Drive's "too many users" page instead of the confirmation page
    before = (home / "local" / CXR / "model.safetensors").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Google Drive did not hand out" in err and "Too many users" in err and "Retry" in err
    assert (home / "local" / CXR / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (home / "local").iterdir()) == [CXR]


def test_the_unpublished_error_and_the_cli_name_the_one_command(home, capsys):
    with pytest.raises(WeightsNotPublishedError) as err:
        ecamp.load("cxr-vit-b")
    assert "`ecamp convert --from-authors cxr-vit-b`" in str(err.value)
    assert "ecamp convert ECAMP_ViT_Base_16.pth --name cxr-vit-b" in str(err.value)
    with pytest.raises(WeightsNotPublishedError) as err:
        ecamp.load("fundus-vit-b")  # no download link in the manifest: only the by-hand conversion
    assert "--from-authors" not in str(err.value)
    assert main(["convert", "--from-authors", "fundus-vit-b"]) == 2
    assert "gives no download link" in capsys.readouterr().err
    assert main(["convert", "--from-authors", "cxr-vit-b", "--name", "cxr-vit-b"]) == 2
    assert "drop --name" in capsys.readouterr().err
    assert main(["convert", "ckpt.pth"]) == 2 and "--name" in capsys.readouterr().err
    assert main(["convert", "ckpt.pth", "--name", "cxr-vit-b", "--force"]) == 2
    assert "--from-authors" in capsys.readouterr().err
    for argv in (["convert"], ["convert", "ckpt.pth", "--from-authors", "cxr-vit-b"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert not (home / "local").exists()


def test_without_gdown_the_error_names_the_extra(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "ecamp\[authors\]"'):
        convert_from_authors("cxr-vit-b")
    assert not (home / "local").exists()
