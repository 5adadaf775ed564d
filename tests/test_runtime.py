"""CPU runtimes: ``ecamp embed`` and ``ecamp predict`` through ONNX Runtime (and OpenVINO, where installed) give
torch's results on real films, from one ONNX export per weights kept in a cache; wrong combinations are refused
before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import ecamp
import ecamp.export
import ecamp.runtime
from ecamp.cli import main
from ecamp.errors import ExportParityError, InvalidArgumentError
from ecamp.models.heads import DetectionModel, SegmentationModel
from ecamp.predict import predict
from ecamp.runtime import prepare, resolve_runtime, runtime_model

from helpers.builders import make_tiny_encoder

pytest.importorskip("onnxruntime")

DICOM = get_testdata_file("RG1_UNCR.dcm")  # a real chest radiograph, 1955x1841, 15-bit MONOCHROME1


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECAMP_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "runtimes"


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """RG1 as DICOM, and as the 8-bit PNG and JPEG a PACS export would give."""
    root = tmp_path_factory.mktemp("films")
    grey = Image.fromarray((ecamp.io.read_image(DICOM, policy="minmax") * 255).round().astype(np.uint8))
    grey.save(root / "rg1.png")
    grey.save(root / "rg1.jpg", quality=90)
    return [DICOM, str(root / "rg1.png"), str(root / "rg1.jpg")]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embed_onnxruntime_matches_torch_and_exports_once(films, cache, monkeypatch):
    model = make_tiny_encoder(3)
    want = ecamp.embed(model, films, batch_size=2, progress=False)
    got = ecamp.embed(model, films, batch_size=2, progress=False, runtime="onnxruntime")
    assert got.shape == want.shape == (3, model.num_features) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    exports = list(cache.iterdir())
    assert len(exports) == 1 and (exports[0] / "model.onnx").is_file()
    assert json.loads((exports[0] / "export.json").read_text())["parity"]["max_abs_diff"] <= 1e-4

    def no_second_export(*args, **kwargs):
        raise AssertionError("the cached graph should have been reused")

    monkeypatch.setattr(ecamp.export, "export", no_second_export)
    again = ecamp.embed(model, films, batch_size=2, progress=False, runtime="onnxruntime")
    np.testing.assert_array_equal(again, got)
    # other weights are another graph: the cache is keyed by the weights, never by the model's name
    other = make_tiny_encoder(4)
    monkeypatch.undo()
    monkeypatch.setenv("ECAMP_HOME", str(cache.parent))
    ecamp.embed(other, films[:1], progress=False, runtime="onnxruntime")
    assert len(list(cache.iterdir())) == 2


def test_cli_embed_runtime_onnxruntime(films, cache, tiny_folder, tmp_path):
    common = ["--model", f"local-dir:{tiny_folder}", "--no-progress", "--batch-size", "2"]
    assert main(["embed", *films, "--out", str(tmp_path / "torch.npy"), *common, "--runtime", "torch"]) == 0
    assert main(["embed", *films, "--out", str(tmp_path / "ort.npy"), *common, "--runtime", "onnxruntime"]) == 0
    want, got = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _head(kind: str) -> torch.nn.Module:
    enc = make_tiny_encoder(5)
    if kind == "classification":
        enc.reset_classifier(3)
        enc.ecamp_cfg = enc.ecamp_cfg.replace(task="classification", activation="sigmoid")
        model = enc
    elif kind == "segmentation":
        model = SegmentationModel(enc, 1, (16, 8))
    else:
        model = DetectionModel(enc, 1, 4, (16, 32, 64), 32, conf_threshold=0.3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kind", ["classification", "segmentation", "detection"])
def test_predict_onnxruntime_matches_torch(kind, films, cache):
    model = _head(kind)
    want = predict(model, films, batch_size=2, progress=False)
    got = predict(model, films, batch_size=2, progress=False, runtime="onnxruntime")
    for w, g in zip(want, got, strict=True):
        if kind == "classification":
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
        elif kind == "segmentation":
            assert g.shape == w.shape and (g != w).mean() < 1e-3  # only pixels with logits within 1e-4 of 0 may flip
        else:
            assert len(g["boxes"]) == len(w["boxes"]) and g["image_size"] == w["image_size"]
            # boxes of equal scores (to float rounding) may come in another order: compare them sorted by place
            og, ow = (np.lexsort(np.round(d["boxes"], 1).T[::-1]) for d in (g, w))
            np.testing.assert_array_equal(g["labels"][og], w["labels"][ow])
            np.testing.assert_allclose(g["boxes"][og], w["boxes"][ow], atol=1e-2, rtol=1e-5)
            np.testing.assert_allclose(g["scores"][og], w["scores"][ow], atol=1e-4, rtol=0)
    if kind == "detection":
        assert sum(len(w["boxes"]) for w in want) > 0


def test_openvino_runtime(films, cache):
    pytest.importorskip("openvino")
    model = make_tiny_encoder(6)
    want = ecamp.embed(model, films, batch_size=2, progress=False)
    f32 = ecamp.embed(model, films, batch_size=2, progress=False, runtime="openvino")
    np.testing.assert_allclose(f32, want, atol=1e-4, rtol=0)
    bf16 = ecamp.embed(model, films, batch_size=2, progress=False, runtime="openvino", dtype=torch.bfloat16)
    assert _cosines(bf16, want).min() >= 0.999
    assert len(list(cache.iterdir())) == 1  # one graph for both precisions


def test_wrong_combinations_are_refused_before_work(films, cache):
    model = make_tiny_encoder(7)
    with pytest.raises(InvalidArgumentError, match="pooled embedding"):
        ecamp.embed(model, films[:1], progress=False, runtime="onnxruntime", features="cls")
    with pytest.raises(InvalidArgumentError, match="float32"):
        ecamp.embed(model, films[:1], progress=False, runtime="onnxruntime", dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="--runtime 'tensorrt'"):
        ecamp.embed(model, films[:1], progress=False, runtime="tensorrt")
    with pytest.raises(InvalidArgumentError, match="runs on the CPU"):
        resolve_runtime("onnxruntime", "cuda", None)
    assert not cache.exists()  # nothing was exported for any of them
    # auto never leaves torch on an accelerator, nor for a precision the graph runtimes do not take
    assert resolve_runtime("auto", "cuda", None) == ("torch", None)
    assert resolve_runtime("auto", "cpu", torch.float16) == ("torch", torch.float16)
    assert runtime_model(model, "torch") is model


def test_auto_resolves_to_openvino_bf16_only_where_the_cpu_computes_bf16(monkeypatch):
    for native, want in ((True, ("openvino", torch.bfloat16)), (False, ("torch", None))):
        monkeypatch.setattr(ecamp.runtime, "_has_openvino_bf16", lambda native=native: native)
        assert resolve_runtime("auto", "cpu", None) == want
        assert resolve_runtime("auto", "cpu", torch.bfloat16) == (want[0], torch.bfloat16)
        assert resolve_runtime("auto", "cpu", torch.float32) == ("torch", None)  # float32 asked for: torch's own
        assert resolve_runtime("auto", "cuda", None) == ("torch", None)


def test_cli_default_runs_auto_and_float32_keeps_torch(films, cache, tiny_folder, tmp_path, capsys):
    common = ["--model", f"local-dir:{tiny_folder}", "--no-progress", "--batch-size", "2"]
    assert main(["embed", *films, "--out", str(tmp_path / "torch.npy"), *common, "--runtime", "torch"]) == 0
    assert main(["embed", *films, "--out", str(tmp_path / "default.npy"), *common]) == 0
    default_line = capsys.readouterr().out
    assert main(["embed", *films, "--out", str(tmp_path / "f32.npy"), *common, "--dtype", "float32"]) == 0
    assert "(torch float32)" in capsys.readouterr().out
    want = np.load(tmp_path / "torch.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "f32.npy"), want)
    got = np.load(tmp_path / "default.npy")
    if ecamp.runtime._has_openvino_bf16():  # this CPU computes bf16 and the extra is installed
        assert "(openvino bfloat16)" in default_line and len(list(cache.iterdir())) == 1
        assert _cosines(got, want).min() >= 0.999
    else:
        assert "(torch float32)" in default_line
        np.testing.assert_array_equal(got, want)
    # tokens are not in the graph: auto keeps torch for them, where an explicit graph runtime is refused
    assert main(["embed", *films[:1], "--out", str(tmp_path / "t.safetensors"), *common, "--features", "tokens"]) == 0
    assert "(torch float32)" in capsys.readouterr().out


def test_auto_falls_back_to_torch_when_the_export_fails(cache, monkeypatch, caplog):
    model = make_tiny_encoder(8)

    def failing(*args, **kwargs):
        raise ExportParityError("the graph differs from torch by up to 0.3 (> atol 0.0001)")

    monkeypatch.setattr(ecamp.runtime, "_has_openvino_bf16", lambda: True)
    monkeypatch.setattr(ecamp.runtime, "_exported", failing)
    with caplog.at_level("WARNING", logger="ecamp"):
        run = prepare(model, "auto", "cpu", None)
    assert run.runtime == "torch" and run.forward is model and run.describe() == "torch float32"
    assert "--runtime auto: openvino could not run this model (ExportParityError" in caplog.text
    with pytest.raises(ExportParityError):  # named explicitly, the error is the answer
        prepare(model, "openvino", "cpu", torch.bfloat16)


def test_two_processes_exporting_the_same_weights_keep_the_first_graph(cache, monkeypatch):
    """torchrun's ranks export at once: the one that renames its graph into the cache first wins, the other
    discards its own and uses that one."""
    model = make_tiny_encoder(9)
    real = ecamp.export.export
    theirs = {}

    def race(src, out, **kwargs):
        target = cache / Path(out).name.split(".")[1]  # .KEY.PID -> KEY: the other process finished first
        theirs["record"] = real(src, target, **kwargs)
        return real(src, out, **kwargs)

    monkeypatch.setattr(ecamp.export, "export", race)
    ort = runtime_model(model, "onnxruntime")
    assert Path(ort.folder) == Path(theirs["record"]["out"])
    assert [p.name for p in cache.iterdir()] == [Path(ort.folder).name]  # nothing of ours left beside it
