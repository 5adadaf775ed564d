"""Test environment: a loopback Hub and private caches, set up before huggingface_hub is imported.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import, so the server starts and the
environment is set here, at conftest import time, before any test imports it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loopback_hub import LoopbackHub  # noqa: E402

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

TINY_ARGS = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 64}


@pytest.fixture(scope="session")
def hub() -> LoopbackHub:
    return _HUB


@pytest.fixture(autouse=True)
def _clean_hub_log(hub: LoopbackHub):
    hub.clear_log()
    yield


def make_tiny_encoder(seed: int = 0, modality: str = "cxr"):
    """A small randomly initialised ECAMP-style encoder (timm ViT, avg pool of patch tokens, no fc_norm)."""
    import timm
    import torch

    import ecamp

    cfg = ecamp.get_pretrained_cfg("cxr-vit-b" if modality == "cxr" else "fundus-vit-b")
    block = cfg.pop("ecamp")
    cfg["input_size"] = [3, 64, 64]
    for key in ("hf_hub_id", "tag"):
        cfg.pop(key, None)
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg=cfg, num_classes=0,
                              global_pool="avg", fc_norm=False, **TINY_ARGS)
    block.pop("name", None)
    model.ecamp_cfg = block
    return model.eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A timm-format folder (config.json, model.safetensors, README.md) of a tiny encoder."""
    import ecamp

    folder = tmp_path_factory.mktemp("tiny-encoder")
    ecamp.save_pretrained(make_tiny_encoder(), folder, name="tiny-cxr")
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def write_manifest(path: Path, repo: str, revision: str, files: dict[str, bytes], *, name: str = "tiny.ecamp_test",
                   alias: str = "tiny-cxr") -> Path:
    """A manifest with one published entry for ``repo`` at ``revision`` (built from the packaged CXR entry)."""
    import hashlib

    import ecamp

    packaged = json.loads((Path(ecamp.__file__).parent / "weights_manifest.json").read_text())
    entry = dict(packaged["models"]["vit_base_patch16_224.ecamp_mimic_cxr"])
    config = json.loads(files["config.json"])
    entry.update(
        aliases=[alias], hf_repo=repo, revision=revision, published=True,
        model_args=config["model_args"], pretrained_cfg={**entry["pretrained_cfg"], "input_size": [3, 64, 64]},
        files=[{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in files.items()],
    )
    path.write_text(json.dumps({"schema_version": 1, "models": {name: entry}}, indent=2))
    return path


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
