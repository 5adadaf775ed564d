"""Fine-tuned models are models: ``ecamp train finetune`` leaves a loadable ``best/`` folder for every head, and
``ecamp predict`` runs it on real files (PNG, a real DICOM radiograph, an unreadable file) with its own
preprocessing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import ecamp
from ecamp.calibration import probabilities
from ecamp.cli import main
from ecamp.errors import ConfigError, InvalidArgumentError, WeightsMismatchError
from ecamp.models.heads import DetectionModel, PyramidSegmentationModel, SegmentationModel
from ecamp.predict import INDEX_NAME, input_transform, iter_predictions, predict, predict_files
from ecamp.train.downstream.recipes import recipe
from ecamp.train.phantom import (
    FINDINGS,
    write_phantom_classification,
    write_phantom_detection,
    write_phantom_segmentation,
)

DICOM = get_testdata_file("RG1_UNCR.dcm")  # a real chest radiograph, from pydicom-data


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Real files: an 8-bit PNG, a 16-bit PNG of another size, the DICOM radiograph, a PNG that is not one."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128), dtype=np.uint8)).save(root / "film.png")
    Image.fromarray(rng.integers(0, 65536, (80, 72), dtype=np.uint16)).save(root / "deep.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    return {"png": str(root / "film.png"), "png16": str(root / "deep.png"), "dicom": DICOM,
            "broken": str(root / "broken.png")}


# -- classification ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_folder) -> tuple[Path, dict]:
    from ecamp.train.downstream.classification import finetune_classification

    base = tmp_path_factory.mktemp("cls")
    data = write_phantom_classification(base / "data", 40, seed=1, size=64)
    r = recipe("cls", "phantom", 100).replace(steps=4, lr=0.01, batch_size=8, warmup=1, eval_every=2)
    metrics = finetune_classification("phantom", 100, data, base / "run", recipe=r,
                                      model_name=f"local-dir:{tiny_folder}", num_workers=0, progress=False)
    return base, metrics


def test_the_best_classifier_is_a_timm_folder_that_scores_the_runs_test_metric(classifier_run):
    from sklearn.metrics import roc_auc_score

    from ecamp.train.downstream.classification import TASKS, ListDataset, read_list_file

    base, metrics = classifier_run
    run = base / "run"
    assert not (run / "best.pt").exists()
    _no_leftovers(run)
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["num_classes"] == 4 and config["label_names"] == list(FINDINGS) == list(TASKS["phantom"].labels)
    assert "num_classes" not in config["model_args"]  # transformers' TimmWrapper passes both side by side
    block = config["ecamp"]
    assert block["task"] == "classification" and block["activation"] == "sigmoid"
    assert block["image_policy"] == "mimic-cxr-jpg" and block["base_model"] == "tiny-cxr"
    assert block["finetune"]["step"] == metrics["best_step"] and block["finetune"]["dataset"] == "phantom"

    model = ecamp.load(f"local-dir:{run / 'best'}")
    assert not model.training and model.label_names == list(FINDINGS) and model.ecamp_cfg.task == "classification"
    # the in-memory best model scored the test list at the end of the run; the loaded one gives the same number
    rows = read_list_file(base / "data" / "test_list.txt", TASKS["phantom"])
    ds = ListDataset(base / "data", rows, ecamp.get_transform(model))
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in torch.utils.data.DataLoader(ds, batch_size=32)]).numpy()
    y = np.stack([r[1] for r in rows])
    per = [roc_auc_score(y[:, c], logits[:, c]) for c in range(4) if 0 < y[:, c].sum() < len(y)]
    assert metrics["test_auroc"] == pytest.approx(float(np.mean(per)), abs=1e-6)


def test_predict_cli_writes_probabilities_of_the_models_own_transform(classifier_run, inputs, tmp_path, capsys):
    base, _ = classifier_run
    best = f"local-dir:{base / 'run' / 'best'}"
    folder = tmp_path / "folder"  # a folder argument is searched for images
    folder.mkdir()
    Image.open(inputs["png"]).save(folder / "copy.png")
    files = [inputs["png"], inputs["broken"], inputs["dicom"], inputs["png16"]]
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", best, *files, str(folder), "--out", str(out), "--no-progress",
                 "--batch-size", "2", "--device", "cpu", "--runtime", "torch"]) == 0
    captured = capsys.readouterr()
    assert "predicted 4 of 5 files" in captured.out
    assert "1 file(s) could not be read" in captured.err and inputs["broken"] in captured.err
    rows = _read_csv(out)
    # the run fitted operating points: a 0/1 decision per finding follows the probabilities
    assert list(rows[0]) == ["path", *FINDINGS, *[f"{f}_decision" for f in FINDINGS], "error"]
    assert [r["path"] for r in rows] == [*files, str(folder / "copy.png")]
    assert rows[1]["error"] and all(rows[1][f] == "" for f in FINDINGS)
    model = ecamp.load(best)
    tf = ecamp.get_transform(model)
    readable = [r for r in rows if not r["error"]]
    with torch.no_grad():  # calibrated by the fit the run stored in the folder
        expected = probabilities(model(torch.stack([tf(r["path"]) for r in readable])), "sigmoid",
                                 model.ecamp_cfg.calibration).numpy()
    got = np.array([[float(r[f]) for f in FINDINGS] for r in readable])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    thresholds = np.array(model.ecamp_cfg.operating_points.thresholds)
    assert [[int(r[f"{f}_decision"]) for f in FINDINGS] for r in readable] == (got >= thresholds).astype(int).tolist()
    np.testing.assert_allclose(got[0], got[-1], rtol=1e-6)  # the same image through the folder
    _no_leftovers(tmp_path)
    # the output kind follows the task
    assert main(["predict", "--model", best, inputs["png"], "--out", str(tmp_path / "p.json")]) == 2
    assert "writes a .csv or .parquet file" in capsys.readouterr().err


def test_a_multiclass_probe_is_softmax_and_written_as_the_timm_model_it_equals(tiny_folder, inputs, tmp_path):
    from ecamp.finetune import LinearProbe
    from ecamp.train.downstream.classification import export_classifier

    probe = LinearProbe(ecamp.load(f"local-dir:{tiny_folder}"), 3).eval()
    torch.nn.init.normal_(probe.head.weight, std=0.5)
    export_classifier(probe, tmp_path / "m", label_names=["normal", "pneumonia", "COVID-19"], multilabel=False)
    model = ecamp.load(f"local-dir:{tmp_path / 'm'}")
    assert model.label_names == ["normal", "pneumonia", "COVID-19"] and model.ecamp_cfg.activation == "softmax"
    x = ecamp.get_transform(model)(inputs["png"])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(x), probe(x))
        probs = predict(model, [inputs["png"], inputs["broken"]], progress=False)
        torch.testing.assert_close(torch.from_numpy(probs[0]), probe(x)[0].softmax(-1))
    assert probs[1] is None and probs[0].sum() == pytest.approx(1.0, abs=1e-6)


def test_an_encoder_without_a_head_is_refused(tiny_folder, inputs, tmp_path):
    with pytest.raises(InvalidArgumentError, match="ecamp embed"):
        predict_files(ecamp.load(f"local-dir:{tiny_folder}"), [inputs["png"]], tmp_path / "x.csv")


# -- segmentation ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory, tiny_folder) -> tuple[Path, dict]:
    from ecamp.train.downstream.segmentation import finetune_segmentation

    base = tmp_path_factory.mktemp("seg")
    data = write_phantom_segmentation(base / "data", 30, seed=2, size=64)
    r = recipe("seg", "phantom-seg", 100).replace(steps=3, lr=3e-3, batch_size=8, warmup=1, eval_every=1)
    metrics = finetune_segmentation("phantom-seg", 100, data, base / "run", recipe=r, decoder_channels=(16, 8),
                                    model_name=f"local-dir:{tiny_folder}", num_workers=0, progress=False)
    return base, metrics


def test_the_best_segmenter_loads_without_training_code_and_scores_the_runs_dice(segmenter_run):
    from ecamp.train.downstream.segmentation import MaskDataset, dice_per_image, read_mask_list

    base, metrics = segmenter_run
    run = base / "run"
    assert not (run / "best.pt").exists()
    _no_leftovers(run)
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["head"] == {"kind": "segvit", "args": {"outputs": 1, "channels": [16, 8],
                                                         "dense_tokens": "final-norm"}}
    assert config["num_classes"] == 1 and config["label_names"] == ["finding"] and config["input_size"] == [3, 64, 64]
    assert config["ecamp"]["task"] == "segmentation"
    assert config["ecamp"]["dense_input"] == {"resize": "antialias-float", "rgb": False}
    model = ecamp.load(f"local-dir:{run / 'best'}")
    assert isinstance(model, SegmentationModel) and not model.training and model.label_names == ["finding"]
    rows = read_mask_list(base / "data" / "test_list.csv")
    encoder_cfg = {**model.encoder.pretrained_cfg, "ecamp": model.ecamp_cfg.to_dict()}
    ds = MaskDataset(base / "data", rows, encoder_cfg, 1, train=False)
    tf = input_transform(model)
    x0, _ = ds[0]
    assert torch.equal(tf(base / "data" / rows[0][0])[0], x0)  # predict reads what training validated on
    with torch.no_grad():
        dice = torch.cat([dice_per_image(model(x), y).mean(1) for x, y in torch.utils.data.DataLoader(ds, 8)])
    assert metrics["test_dice"] == pytest.approx(float(dice.mean()), abs=1e-6)


def test_predict_writes_one_mask_per_input_at_its_own_size(segmenter_run, inputs, tmp_path, capsys):
    base, _ = segmenter_run
    best = f"local-dir:{base / 'run' / 'best'}"
    out = tmp_path / "masks"
    files = [inputs["png"], inputs["dicom"], inputs["broken"]]
    assert main(["predict", "--model", best, *files, "--out", str(out), "--no-progress"]) == 0
    assert inputs["broken"] in capsys.readouterr().err
    rows = _read_csv(out / INDEX_NAME)
    assert list(rows[0]) == ["path", "mask", "finding_pixels", "error"]
    assert [r["path"] for r in rows] == files and rows[2]["error"] and not rows[2]["mask"]
    model = ecamp.load(best)
    x, size = input_transform(model)(inputs["png"])
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(model(x[None]), size=size, mode="bilinear", align_corners=False)
    mask = np.asarray(Image.open(out / rows[0]["mask"]))
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, (logits[0, 0] > 0).numpy())
    assert int(rows[0]["finding_pixels"]) == int((mask == 255).sum())
    dicom_mask = Image.open(out / rows[1]["mask"])
    assert dicom_mask.size[::-1] == ecamp.io.read_image(DICOM).shape[:2]
    _no_leftovers(tmp_path)
    # an earlier prediction is replaced as a whole; a folder of other files is never touched
    assert main(["predict", "--model", best, inputs["png"], "--out", str(out), "--no-progress"]) == 0
    assert [r["path"] for r in _read_csv(out / INDEX_NAME)] == [inputs["png"]]
    assert sorted(p.name for p in out.iterdir()) == ["film.png", INDEX_NAME]  # named below the inputs' folder
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["predict", "--model", best, inputs["png"], "--out", str(other)]) == 2
    assert "not an earlier prediction" in capsys.readouterr().err and (other / "notes.txt").is_file()


# -- detection ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_run(tmp_path_factory, tiny_folder) -> tuple[Path, dict]:
    from ecamp.train.downstream.detection import finetune_detection

    base = tmp_path_factory.mktemp("det")
    data = write_phantom_detection(base / "data", 30, seed=3, size=64)
    r = recipe("det", "phantom-det", 100).replace(steps=2, batch_size=8, warmup=1, eval_every=1, start_eval=0)
    metrics = finetune_detection("phantom-det", 100, data, base / "run", recipe=r, widths=(16, 32, 64), head_width=32,
                                 conf_threshold=0.6, iou_threshold=0.45, model_name=f"local-dir:{tiny_folder}",
                                 num_workers=0, progress=False)
    return base, metrics


def test_the_best_detector_keeps_its_thresholds_and_scores_the_runs_map(detector_run):
    from ecamp.train.downstream.detection import BoxDataset, collate_boxes, mean_average_precision, read_box_list

    base, metrics = detector_run
    run = base / "run"
    _no_leftovers(run)
    model = ecamp.load(f"local-dir:{run / 'best'}")
    assert isinstance(model, DetectionModel) and model.label_names == ["finding"]
    assert (model.conf_threshold, model.iou_threshold, model.nms_iou_plus_one) == (0.6, 0.45, False)
    assert model.ecamp_cfg.task == "detection" and model.ecamp_cfg.finetune["step"] == metrics["best_step"]
    rows = read_box_list(base / "data" / "test_list.csv")
    ds = BoxDataset(base / "data", rows, {**model.encoder.pretrained_cfg, "ecamp": model.ecamp_cfg.to_dict()})
    preds, truths = [], []
    for x, boxes in torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_boxes):
        preds += model.detect(x)
        truths += [{"boxes": b * 64, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
    assert metrics["test_map"] == pytest.approx(mean_average_precision(preds, truths), abs=1e-6)


def test_predict_gives_boxes_in_the_original_pixels(detector_run, inputs, tmp_path, capsys):
    base, _ = detector_run
    best = f"local-dir:{base / 'run' / 'best'}"
    out = tmp_path / "boxes.json"
    assert main(["predict", "--model", best, inputs["png"], inputs["broken"], inputs["dicom"], "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["task"] == "detection" and doc["label_names"] == ["finding"]
    first, broken, dicom = doc["files"]
    assert (first["height"], first["width"]) == (96, 128) and broken["error"] and "detections" not in broken
    assert (dicom["height"], dicom["width"]) == ecamp.io.read_image(DICOM).shape[:2]
    for det in first["detections"]:
        assert det["label"] == "finding" and det["score"] >= 0.6 and len(det["box"]) == 4
    # every box found on the 64-px input, scaled to the 96 x 128 film (a threshold of 0 keeps them all)
    model = ecamp.load(best)
    model.conf_threshold = 0.0
    x, _ = input_transform(model)(inputs["png"])
    raw = model.detect(x[None])[0]
    (_, got, _), = iter_predictions(model, [inputs["png"]], progress=False)
    assert len(got["boxes"]) == len(raw["boxes"]) > 0
    expected = (raw["boxes"] * torch.tensor([2.0, 1.5, 2.0, 1.5])).clamp_min(0)
    expected[:, 0::2], expected[:, 1::2] = expected[:, 0::2].clamp(max=128), expected[:, 1::2].clamp(max=96)
    np.testing.assert_allclose(got["boxes"], expected.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["scores"], raw["scores"].numpy())


# -- the folder format -------------------------------------------------------------------------------------------
def _dense_models(tiny_encoder):
    return [SegmentationModel(tiny_encoder(0), 2, (16, 8)), PyramidSegmentationModel(tiny_encoder(1), 1, 16),
            DetectionModel(tiny_encoder(2), 1, 4, (16, 32, 64), 32, dense_tokens="raw-block")]


def test_every_dense_head_round_trips_its_folder(tmp_path):
    from helpers.builders import make_tiny_encoder

    x = torch.randn(2, 3, 64, 64)
    for k, model in enumerate(_dense_models(make_tiny_encoder)):
        model.label_names = [f"out{i}" for i in range(model.head_args.get("outputs", 1))]
        for p in model.parameters():  # a trained head: not its initialisation
            torch.nn.init.normal_(p, std=0.05)
        ecamp.save_pretrained(model.eval(), tmp_path / str(k))
        loaded = ecamp.load(f"local-dir:{tmp_path / str(k)}")
        assert type(loaded) is type(model) and loaded.label_names == model.label_names
        with torch.no_grad():
            a, b = model(x), loaded(x)
        for u, v in zip([a] if torch.is_tensor(a) else a, [b] if torch.is_tensor(b) else b, strict=True):
            assert torch.equal(u, v)
        assert ecamp.get_pretrained_cfg(f"local-dir:{tmp_path / str(k)}")["crop_mode"] == "squash"


def test_a_broken_or_hostile_dense_folder_is_refused(tmp_path):
    from helpers.builders import make_tiny_encoder

    model = SegmentationModel(make_tiny_encoder(), 1, (16, 8))
    ecamp.save_pretrained(model, tmp_path / "m")
    with pytest.raises(InvalidArgumentError, match="segmentation model; num_classes"):
        ecamp.load(f"local-dir:{tmp_path / 'm'}", num_classes=3)
    with pytest.raises(InvalidArgumentError, match="one name per output"):
        ecamp.save_pretrained(model, tmp_path / "x", label_names=["a", "b"])
    config_path = tmp_path / "m" / "config.json"
    good = json.loads(config_path.read_text())
    for args, match in [({"outputs": 10**9}, "outputs"), ({"outputs": 1, "channels": [10**6]}, "channels"),
                        ({"outputs": 1, "colour": "red"}, "cannot be built")]:
        config_path.write_text(json.dumps({**good, "head": {"kind": "segvit", "args": args}}))
        with pytest.raises(ConfigError, match=match):
            ecamp.load(f"local-dir:{tmp_path / 'm'}")
    config_path.write_text(json.dumps({**good, "head": {"kind": "segvit", "args": {**good["head"]["args"],
                                                                                   "outputs": 2}}}))
    with pytest.raises(WeightsMismatchError, match="unexpected|missing"):
        ecamp.load(f"local-dir:{tmp_path / 'm'}")


def test_predict_writes_parquet_with_the_csvs_values(classifier_run, inputs, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    best = f"local-dir:{classifier_run[0] / 'run' / 'best'}"
    files = [inputs["png"], inputs["broken"], inputs["dicom"]]
    for suffix in (".csv", ".parquet"):
        assert main(["predict", "--model", best, *files, "--out", str(tmp_path / f"p{suffix}"), "--no-progress",
                     "--device", "auto"]) == 0
    table = pd.read_parquet(tmp_path / "p.parquet")
    decisions = [f"{f}_decision" for f in FINDINGS]
    assert list(table.columns) == ["path", *FINDINGS, *decisions, "error"] and list(table["path"]) == files
    rows = _read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(table.loc[[0, 2], list(FINDINGS)].to_numpy(),
                               [[float(rows[i][f]) for f in FINDINGS] for i in (0, 2)], rtol=1e-6)
    assert table.loc[[0, 2], decisions].to_numpy().tolist() == [[int(rows[i][d]) for d in decisions] for i in (0, 2)]
    assert table.loc[1, list(FINDINGS)].isna().all() and table.loc[1, "error"]
