"""Test environment: a loopback Hub and private caches, set up before huggingface_hub is imported.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import, so the server starts and the
environment is set here, at conftest import time, before any test imports it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# tests/ on sys.path: test modules import the shared helpers as ``from helpers.X import Y`` (tests/helpers/)
sys.path.insert(0, str(Path(__file__).parent))

from helpers.loopback_hub import LoopbackHub  # noqa: E402

_HUB = LoopbackHub().start()
_ROOT = Path(tempfile.mkdtemp(prefix="ecamp-tests-"))
os.environ["HF_ENDPOINT"] = _HUB.url
os.environ["HF_HOME"] = str(_ROOT / "hf-home")
os.environ["ECAMP_HOME"] = str(_ROOT / "ecamp-home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ECAMP_MANIFEST",
            "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(var, None)

import pytest  # noqa: E402

from helpers.builders import folder_files, make_tiny_encoder, write_manifest  # noqa: E402


@pytest.fixture(scope="session")
def hub() -> LoopbackHub:
    return _HUB


@pytest.fixture(autouse=True)
def _clean_hub_log(hub: LoopbackHub):
    hub.clear_log()
    yield


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A timm-format folder (config.json, model.safetensors, README.md) of a tiny encoder."""
    import ecamp

    folder = tmp_path_factory.mktemp("tiny-encoder")
    ecamp.save_pretrained(make_tiny_encoder(), folder, name="tiny-cxr")
    return folder


@pytest.fixture
def published(hub, tiny_folder, tmp_path, request):
    """A tiny encoder published on the loopback Hub under a per-test repo, with a manifest pinning it."""
    repo = f"ecamp-test/{request.node.name.replace('[', '-').replace(']', '')[:80]}"
    files = folder_files(tiny_folder)
    sha = hub.commit(repo, files)
    manifest = write_manifest(tmp_path / "manifest.json", repo, sha, files)
    hub.clear_log()

    class Published:
        pass

    p = Published()
    p.repo, p.sha, p.files, p.manifest, p.name, p.alias = repo, sha, files, manifest, "tiny.ecamp_test", "tiny-cxr"
    p.cache = tmp_path / "hf-cache"
    return p
