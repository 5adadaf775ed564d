"""`ecamp export`: every image-model kind exported to ONNX loads in ONNX Runtime and gives torch's outputs, at
a batch size other than the traced one; detection boxes after ecamp's decode and NMS, and segmentation masks
after thresholding, agree too."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import ecamp
from ecamp.errors import ExportParityError, MissingDependencyError, ModelFolderError
from ecamp.export import OnnxModel, export
from ecamp.models.heads import DetectionModel, PyramidSegmentationModel, SegmentationModel

from helpers.builders import make_tiny_encoder

pytest.importorskip("onnxruntime")

KINDS = ("encoder", "classifier", "segmentation", "pyramid", "detection")


def _weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    enc = make_tiny_encoder(seed)
    if kind == "encoder":
        return _weights(enc, seed)
    if kind == "classifier":
        enc.reset_classifier(3)
        enc.ecamp_cfg = enc.ecamp_cfg.replace(task="classification", activation="sigmoid")
        return _weights(enc, seed)
    return _weights({"segmentation": lambda: SegmentationModel(enc, 2, (16, 8)),
                     "pyramid": lambda: PyramidSegmentationModel(enc, 1, 16),
                     "detection": lambda: DetectionModel(enc, 1, 4, (16, 32, 64), 32, conf_threshold=0.3)}[kind](),
                    seed)


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_matches_torch(kind, tmp_path):
    model = _model(kind)
    folder = tmp_path / "folder"
    ecamp.save_pretrained(model, folder)
    out = tmp_path / "onnx"
    record = export(folder, out, format="onnx")
    assert record["parity"]["max_abs_diff"] <= 1e-4 and record["opset"] >= 17
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.onnx"]
    written = json.loads((out / "export.json").read_text())
    assert written["inputs"][0]["shape"] == ["batch", 3, 64, 64] and written["opset"] == record["opset"]
    # the preprocessing a deployment needs travels with the graph
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    assert written["preprocessing"]["ecamp"]["image_policy"] == model_ecamp(model).image_policy

    # a batch size the graph was not traced with, on the loaded folder's model and ONNX Runtime
    loaded = ecamp.load(folder)
    runtime = OnnxModel(out)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = loaded(x)
    got = runtime(x)
    pairs = list(zip(want, got, strict=True)) if kind == "detection" else [(want, got)]
    for w, g in pairs:
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= 1e-4
    if kind == "detection":
        ref, dep = loaded.detect(x), runtime.detect(x)
        assert sum(len(r["boxes"]) for r in ref) > 0
        for r, d in zip(ref, dep, strict=True):
            assert len(r["boxes"]) == len(d["boxes"])
            assert torch.equal(r["labels"], d["labels"])
            torch.testing.assert_close(d["boxes"], r["boxes"], atol=1e-3, rtol=1e-5)
            torch.testing.assert_close(d["scores"], r["scores"], atol=1e-4, rtol=0)
    if kind in ("segmentation", "pyramid"):
        sure = want.abs() > 1e-4  # pixels on the threshold may fall either side
        assert torch.equal((torch.sigmoid(want) >= 0.5)[sure], (torch.sigmoid(got) >= 0.5)[sure])


def model_ecamp(model):
    return (model.encoder if hasattr(model, "head_args") else model).ecamp_cfg


def test_torchscript_export_and_cli(tmp_path, capsys):
    from ecamp.cli import main

    folder = tmp_path / "folder"
    ecamp.save_pretrained(_model("detection", 1), folder)
    assert main(["export", str(folder), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    line = capsys.readouterr().out
    assert "max abs difference from torch" in line and "detection" in line
    module = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(module(x), ecamp.load(folder)(x), strict=True):
            assert float((a - b).abs().max()) <= 1e-4

    assert main(["export", f"local-dir:{folder}", "--out", str(tmp_path / "onnx")]) == 0
    assert "(onnx, opset" in capsys.readouterr().out


def test_parity_failure_writes_nothing(tmp_path):
    out = tmp_path / "onnx"
    with pytest.raises(ExportParityError, match="differs from torch"):
        export(_model("encoder"), out, atol=1e-15)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_refusals(tmp_path, monkeypatch):
    from ecamp.config import EcampCfg
    from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel

    pre = ECAMPPretrainModel(ECAMPPretrainConfig.tiny())
    pre.ecamp_cfg = EcampCfg(modality="cxr", image_policy="mimic-cxr-jpg", grayscale=True)
    ecamp.save_pretrained(pre, tmp_path / "pre")
    with pytest.raises(ModelFolderError, match="pre-training model"):
        export(tmp_path / "pre", tmp_path / "out", format="torchscript")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"ecamp\[onnx\]"):
        export(_model("encoder"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_a_hub_repo(hub, tmp_path):
    from helpers.loopback_hub import WRITE_TOKEN

    folder = tmp_path / "folder"
    ecamp.save_pretrained(_model("classifier", 4), folder)
    ecamp.push(folder, "ecamp-export/clf", token=WRITE_TOKEN)
    record = export("hf-hub:ecamp-export/clf", tmp_path / "onnx")
    assert record["kind"] == "classification" and record["source"] == "hf-hub:ecamp-export/clf"
    assert record["outputs"] == ["logits"] and record["parity"]["max_abs_diff"] <= 1e-4
    assert (tmp_path / "onnx" / "config.json").read_bytes() == (folder / "config.json").read_bytes()
