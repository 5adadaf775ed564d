"""The manifest schema: the packaged manifest validates and malformed ones fail with a precise message."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

import ecamp
from ecamp.errors import ManifestError, UnknownModelError
from ecamp.registry import load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[1]


def _packaged() -> dict:
    return json.loads((Path(ecamp.__file__).parent / "weights_manifest.json").read_text())


def test_top_level_manifest_is_the_packaged_one():
    assert (ROOT / "weights_manifest.json").read_bytes() == (ROOT / "ecamp" / "weights_manifest.json").read_bytes()


def test_packaged_manifest_names_and_required_content():
    man = load_manifest()
    assert set(man.aliases) == {"cxr-vit-b", "fundus-vit-b", "cxr-ecamp-b-pretrain", "fundus-ecamp-b-pretrain"}
    assert man.resolve("cxr-vit-b").name == "vit_base_patch16_224.ecamp_mimic_cxr"
    assert man.resolve("fundus-vit-b").name == "vit_base_patch16_224.ecamp_ffa_ir"
    for name in ("cxr-vit-b", "fundus-vit-b"):
        e = man.resolve(name)
        assert e.kind == "encoder" and e.architecture == "vit_base_patch16_224"
        assert e.pretrained_cfg["mean"] == [0.4722] * 3 and e.pretrained_cfg["std"] == [0.3028] * 3
        assert e.pretrained_cfg["input_size"] == [3, 224, 224]
        assert e.model_args == {"global_pool": "avg", "fc_norm": False}
        assert e.provenance["paper"]["doi"] == "10.1016/j.media.2025.103690"
        assert e.provenance["original_file"].startswith("ECAMP_ViT_Base_16")
        assert e.ecamp["modality"] in ("cxr", "fundus")
        # Nothing is published yet, so nothing may claim a hash, and no metric may be invented.
        assert e.published is False and e.revision is None
        assert all(f.sha256 is None and f.size is None for f in e.files)
        assert e.metrics == ()
    for name in ("cxr-ecamp-b-pretrain", "fundus-ecamp-b-pretrain"):
        assert man.resolve(name).kind == "pretrain"


def test_list_models_and_filter():
    names = ecamp.list_models()
    assert {"cxr-vit-b", "fundus-vit-b", "vit_base_patch16_224.ecamp_mimic_cxr"} <= set(names)
    assert ecamp.list_models("*fundus*") == sorted(n for n in names if "fundus" in n)
    assert ecamp.list_models(published_only=True) == []


def test_get_pretrained_cfg_offline():
    cfg = ecamp.get_pretrained_cfg("cxr-vit-b")
    assert cfg["input_size"] == [3, 224, 224] and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert cfg["ecamp"]["modality"] == "cxr" and cfg["ecamp"]["image_policy"]
    cfg["mean"][0] = 99  # a copy: callers cannot corrupt the registry
    assert ecamp.get_pretrained_cfg("cxr-vit-b")["mean"][0] == 0.4722


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError) as err:
        ecamp.get_pretrained_cfg("cxr-vit-bb")
    assert "Did you mean 'cxr-vit-b'" in str(err.value)
    assert isinstance(err.value, KeyError)


def _mutate(fn) -> dict:
    data = copy.deepcopy(_packaged())
    fn(data)
    return data


CXR = "vit_base_patch16_224.ecamp_mimic_cxr"


@pytest.mark.parametrize("mutation, message", [
    (lambda d: d["models"][CXR].pop("provenance"), "missing field 'provenance'"),
    (lambda d: d["models"][CXR].update(typo_field=1), "unknown field"),
    (lambda d: d["models"][CXR].update(published=True), "pins a 40-hex commit"),
    (lambda d: d["models"][CXR].update(published=True, revision="a" * 40), "needs sha256 and size"),
    (lambda d: d["models"][CXR]["files"][0].update(sha256="xyz"), "64 lower-case hex"),
    (lambda d: d["models"][CXR]["files"][0].update(size=True), "boolean"),
    (lambda d: d["models"][CXR]["pretrained_cfg"].update(mean=[0.5]), "one number per input channel"),
    (lambda d: d["models"][CXR]["pretrained_cfg"].update(interpolation="lanczos9"), "interpolation"),
    (lambda d: d["models"][CXR]["ecamp"].update(modality="mri"), "modality"),
    (lambda d: d["models"][CXR].update(aliases=["fundus-vit-b"]), "used twice"),
    (lambda d: d["models"][CXR].update(files=[{"path": "config.json", "sha256": None, "size": None}]),
     "model.safetensors"),
    (lambda d: d["models"][CXR]["metrics"].append({"task": "x", "metric": "auroc", "value": 0.9}),
     "missing field 'source'"),
    (lambda d: d.update(schema_version=2), "version"),
    (lambda d: d["models"][CXR].update(hf_repo="not a repo"), "org/name"),
])
def test_invalid_manifests_are_rejected(mutation, message):
    with pytest.raises(ManifestError, match=re.escape(message)):
        parse_manifest(_mutate(mutation), source="test.json")


def test_published_entry_validates():
    def publish(d):
        e = d["models"][CXR]
        e.update(published=True, revision="0123456789abcdef0123456789abcdef01234567")
        for f in e["files"]:
            f.update(sha256="ab" * 32, size=10)
        e["metrics"].append({"task": "ChestX-ray14", "metric": "auroc", "value": 0.8, "source": "a cited table"})

    man = parse_manifest(_mutate(publish))
    assert man.resolve("cxr-vit-b").published


def test_bad_manifest_path_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("ECAMP_MANIFEST", str(tmp_path / "missing.json"))
    with pytest.raises(ManifestError, match="ECAMP_MANIFEST"):
        ecamp.list_models()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(broken)


def test_cli_list_console_script():
    import subprocess
    import sys

    # the interpreter running the tests, not whatever `ecamp` is on PATH: the suite also runs as
    # /path/venv/bin/python -m pytest without an activated venv
    script = Path(sys.executable).parent / ("ecamp.exe" if sys.platform == "win32" else "ecamp")
    exe = [str(script)] if script.is_file() else [sys.executable, "-m", "ecamp"]
    out = subprocess.run([*exe, "list"], capture_output=True, text=True, timeout=60, check=True)
    assert "cxr-vit-b" in out.stdout and "vit_base_patch16_224.ecamp_ffa_ir" in out.stdout
    assert "not published yet" in out.stdout
    data = json.loads(subprocess.run([*exe, "list", "--json"], capture_output=True, text=True, timeout=60,
                                     check=True).stdout)
    assert {d["name"] for d in data} == set(load_manifest().models)
    bad = subprocess.run([*exe, "download", "cxr-vit-bb"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Did you mean 'cxr-vit-b'" in bad.stderr
