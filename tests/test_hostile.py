"""Hostile model folders: a config.json that asks for an absurd model is refused before anything is built."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import ecamp
import ecamp.models.encoder as encoder_module
from ecamp.errors import ConfigError, InvalidArgumentError, InvalidWeightsFileError, WeightsMismatchError

from helpers.builders import folder_files


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if ecamp.load reaches the model constructor."""

    def refuse(*args, **kwargs):
        raise AssertionError("build_encoder was called: the check came too late")

    monkeypatch.setattr(encoder_module, "build_encoder", refuse)


def _edited(tiny_folder: Path, dest: Path, **model_args) -> Path:
    dest.mkdir()
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["model_args"].update(model_args)
    (dest / "config.json").write_text(json.dumps(cfg))
    (dest / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    return dest


def test_absurd_img_size_fails_fast_and_names_the_file_and_field(tiny_folder, tmp_path, no_build):
    folder = _edited(tiny_folder, tmp_path / "huge", img_size=[200000, 200000])
    with pytest.raises(ConfigError, match=r"model_args\.img_size") as err:
        ecamp.load(f"local-dir:{folder}")
    assert "config.json" in str(err.value) and err.value.path == str(folder / "config.json")
    with pytest.raises(ConfigError, match=r"model_args\.img_size"):  # the architecture alone is checked too
        ecamp.load(f"local-dir:{folder}", pretrained=False)


@pytest.mark.parametrize("args, field", [
    (dict(depth=3), r"model_args\.depth 3 .*blocks\.0-1 \(2 blocks\); missing blocks\.2\."),
    (dict(depth=1), r"model_args\.depth 1 .*2 blocks"),
    (dict(img_size=128), r"model_args\.img_size .*17 positions, not the 64 patches"),
    (dict(patch_size=8), r"model_args\.patch_size"),
    (dict(embed_dim=96, num_heads=3), r"model_args\.embed_dim"),
])
def test_config_disagreeing_with_the_weights_header(tiny_folder, tmp_path, no_build, args, field):
    folder = _edited(tiny_folder, tmp_path / "bad", **args)
    with pytest.raises(WeightsMismatchError, match=field) as err:
        ecamp.load(f"local-dir:{folder}")
    assert err.value.path == str(folder / "config.json") and "model.safetensors" in str(err.value)


def test_sizes_within_bounds_but_absurd_together(tiny_folder, tmp_path, no_build):
    # each field is within its bound; together they would be some 1e11 parameters
    folder = _edited(tiny_folder, tmp_path / "wide", depth=128, embed_dim=8192, num_heads=64)
    with pytest.raises(ConfigError, match=r"model_args\.depth 128 gives a model of about 1(\.\d)?e\+11"):
        ecamp.load(f"local-dir:{folder}", pretrained=False)


@pytest.mark.parametrize("kwargs, field", [
    (dict(img_size=200000), "img_size=200000"),
    (dict(num_classes=10**9), "num_classes=1000000000"),
    (dict(depth=True), "depth=True"),
])
def test_absurd_keyword_arguments(tiny_folder, no_build, kwargs, field):
    with pytest.raises(InvalidArgumentError, match=field):
        ecamp.load(f"local-dir:{tiny_folder}", **kwargs)


def test_legitimate_override_still_resamples_pos_embed(tiny_folder):
    # the weights are 64 px (4x4 grid); asking for 128 px is an override, checked against bounds only
    model = ecamp.load(f"local-dir:{tiny_folder}", img_size=128)
    assert model.pos_embed.shape == (1, 65, 48)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 48)


def test_corrupt_header_is_refused_before_building(tiny_folder, tmp_path, no_build):
    folder = _edited(tiny_folder, tmp_path / "hdr")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**15) + data[8:])
    with pytest.raises(InvalidWeightsFileError, match="safetensors") as err:
        ecamp.load(f"local-dir:{folder}")
    assert err.value.path == str(folder / "model.safetensors")


def test_hostile_hub_repo(hub, tiny_folder, tmp_path, no_build):
    files = folder_files(tiny_folder)
    cfg = json.loads(files["config.json"])
    cfg["model_args"]["img_size"] = [200000, 200000]
    hub.commit("ecamp-test/hostile", {**files, "config.json": json.dumps(cfg).encode()})
    with pytest.raises(ConfigError, match=r"config\.json \(hf-hub:ecamp-test/hostile\): model_args\.img_size"):
        ecamp.load("hf-hub:ecamp-test/hostile", cache_dir=tmp_path / "cache")
