"""A practitioner's own data: class folders and a labels CSV through `ecamp train finetune --dataset custom`, the
fitted calibration and operating points, `ecamp predict`'s decisions, transformers' pipeline on the same folder,
and malformed data refused before anything is built."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ecamp
from ecamp.cli import main as ecamp_main
from ecamp.errors import ConfigError, DataError, InvalidArgumentError
from ecamp.train.cli import main as train_main
from ecamp.train.downstream.calibrate import fit, report
from ecamp.train.downstream.custom import CustomSpec, read_custom, stratified_split
from ecamp.train.phantom import FINDINGS, write_phantom_classification

_TRAIN = ["--max-steps", "40", "--lr", "0.03", "--batch-size", "32", "--warmup", "5", "--num-workers", "0",
          "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> tuple[Path, list[tuple[str, list[int]]]]:
    """120 phantom films (64 px, the tiny encoder's input size) and their four 0/1 findings."""
    root = write_phantom_classification(tmp_path_factory.mktemp("own"), 120, seed=4, size=64, variation=0.0)
    rows = []
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        for line in (root / name).read_text().splitlines():
            if line.strip():
                path, *ys = line.split()
                rows.append((path, [int(float(v)) for v in ys]))
    return root, rows


def _class_folders(films, out: Path) -> Path:
    root, rows = films
    for path, ys in rows:
        folder = out / ("effusion" if ys[0] else "clear")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / path, folder / Path(path).name)
    return out


def _labels_csv(films, out: Path) -> Path:
    _, rows = films
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *FINDINGS])
        w.writerows([[p, *ys] for p, ys in rows])
    return out


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pipeline_agrees(best: Path, raw_csv: Path, labels: list[str], n: int = 4) -> None:
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(best))
    for row in _read(raw_csv)[:n]:
        scores = {d["label"]: d["score"] for d in pipe(row["path"], top_k=None)}
        np.testing.assert_allclose([scores[c] for c in labels], [float(row[c]) for c in labels], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["class folders", "labels CSV"])
def test_own_data_trains_calibrates_and_predicts_decisions(films, tiny_folder, tmp_path, layout):
    if layout == "class folders":
        data_root = _class_folders(films, tmp_path / "films")
        where, labels, activation = [], ["clear", "effusion"], "softmax"
    else:
        data_root = films[0]
        where, labels, activation = ["--labels", str(_labels_csv(films, tmp_path / "labels.csv")),
                                     "--pos-weight", "auto"], list(FINDINGS), "sigmoid"
    run = tmp_path / "run"
    assert train_main(["finetune", "--dataset", "custom", "--data-root", str(data_root), *where, "--output-dir",
                       str(run), "--model", f"local-dir:{tiny_folder}", *_TRAIN]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    counts = metrics["data"]["counts"]
    assert metrics["data"]["labels"] == labels and sum(c["images"] for c in counts.values()) == 120
    assert all(counts[s][c] > 0 for s in ("val", "test") for c in labels if counts["train"][c] >= 3)  # stratified
    assert set(metrics["operating_points"]["labels"]) == set(labels)
    assert metrics["calibration"]["fitted_on"] == f"val ({counts['val']['images']} images)"
    assert (run / "reliability.png").stat().st_size > 10_000
    assert "## Operating points" in (run / "report.md").read_text()

    best = ecamp.load(f"local-dir:{run / 'best'}")  # label names, calibration and thresholds travel with it
    block = best.ecamp_cfg
    assert best.label_names == labels and block.activation == activation
    assert block.operating_points is not None and len(block.operating_points.thresholds) == len(labels)
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["problem_type"] == ("multi_label_classification" if activation == "sigmoid" else
                                      "single_label_classification")

    # the split is written and read back: --labels run/splits.csv repeats it exactly
    split_rows = _read(run / "splits.csv")
    assert len(split_rows) == 120 and {r["split"] for r in split_rows} == {"train", "val", "test"}
    again = read_custom(CustomSpec(Path(data_root), labels_csv=run / "splits.csv"), seed=99)
    first = read_custom(CustomSpec(Path(data_root), labels_csv=Path(where[1]) if where else None), seed=3)
    assert {s: [n for n, _ in again.rows[s]] for s in again.rows} == \
        {s: [n for n, _ in first.rows[s]] for s in first.rows}

    images = [str(Path(data_root) / r["path"]) for r in split_rows if r["split"] == "test"]
    files = tmp_path / "test_files"
    files.mkdir()
    for i, img in enumerate(images):  # one folder of the test films, as a user would pass it
        shutil.copy(img, files / f"{i:03d}.png")
    assert ecamp_main(["predict", str(files), "--model", f"local-dir:{run / 'best'}", "--out",
                       str(tmp_path / "p.csv"), "--no-progress", "--runtime", "torch"]) == 0
    assert ecamp_main(["predict", str(files), "--model", f"local-dir:{run / 'best'}", "--out",
                       str(tmp_path / "raw.csv"), "--no-progress", "--no-calibration",
                       "--runtime", "torch"]) == 0  # the pipeline runs torch's float32
    calibrated, raw = _read(tmp_path / "p.csv"), _read(tmp_path / "raw.csv")
    assert list(calibrated[0]) == ["path", *labels, *[f"{c}_decision" for c in labels],
                                   *(["prediction"] if activation == "softmax" else []), "error"]
    points, cal = block.operating_points, block.calibration
    for c_row, r_row in zip(calibrated, raw, strict=True):
        z_free = torch.tensor([[float(r_row[c]) for c in labels]])
        p = torch.tensor([[float(c_row[c]) for c in labels]])
        if cal is None:
            torch.testing.assert_close(p, z_free, rtol=0, atol=1e-6)
        for k, c in enumerate(labels):  # each decision is its probability at or above its threshold
            assert int(c_row[f"{c}_decision"]) == int(p[0, k] >= points.thresholds[k])
            assert int(r_row[f"{c}_decision"]) == int(z_free[0, k] >= points.raw_thresholds[k])
    _pipeline_agrees(run / "best", tmp_path / "raw.csv", labels)


def test_stratified_split_is_seeded_and_gives_every_class_to_every_split():
    strata = ["a"] * 50 + ["b"] * 7 + ["c"] * 3
    one, two = stratified_split(strata, 0, 0.1, 0.2), stratified_split(strata, 0, 0.1, 0.2)
    assert one == two and one != stratified_split(strata, 1, 0.1, 0.2)
    for s in ("train", "val", "test"):
        assert {k for k, t in zip(strata, one, strict=True) if t == s} == {"a", "b", "c"}
    assert one.count("test") == 10 + 1 + 1 and one.count("val") == 5 + 1 + 1


def test_group_column_keeps_each_patient_in_one_split(films, tmp_path):
    root, rows = films
    # three films per patient (40 patients), labelled per film; the patient column is not a label
    lines = ["path,patient_id,effusion,nodule"] + [f"{n},p{i // 3:02d},{ys[0]},{ys[1]}"
                                                   for i, (n, ys) in enumerate(rows)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    spec = CustomSpec(root, labels_csv=labels, group_column="patient_id", val_fraction=0.2, test_fraction=0.2)
    data = read_custom(spec, seed=5)
    patient = {n: f"p{i // 3:02d}" for i, (n, _) in enumerate(rows)}
    split_of: dict[str, set[str]] = {}
    for s in ("train", "val", "test"):
        for name, _ in data.rows[s]:
            split_of.setdefault(patient[name], set()).add(s)
    assert len(split_of) == 40 and all(len(v) == 1 for v in split_of.values())
    assert sum(len(data.rows[s]) for s in data.rows) == 120 and data.labels == ("effusion", "nodule")
    assert [sum(1 for v in split_of.values() if v == {s}) for s in ("val", "test")] == [8, 8]  # groups counted
    assert "by patient_id (40 patient_id groups, each in one split)" in data.split
    again = read_custom(spec, seed=5)  # seeded
    assert {k: [n for n, _ in v] for k, v in again.rows.items()} == {k: [n for n, _ in v] for k, v in data.rows.items()}

    # a split of the user's own that leaks a patient is refused, naming both lines
    leaky = tmp_path / "leaky.csv"
    body = [f"{n},p{i // 3:02d},{'train' if i % 3 else 'test'},{ys[0]}" for i, (n, ys) in enumerate(rows)]
    leaky.write_text("path,patient_id,split,effusion\n" + "\n".join(body) + "\n")
    with pytest.raises(DataError, match=r"leaky.csv:3: patient_id 'p00' is in train, and in test at .*leaky.csv:2"):
        read_custom(CustomSpec(root, labels_csv=leaky, group_column="patient_id"))
    with pytest.raises(DataError, match="has no column 'patient'"):
        read_custom(CustomSpec(root, labels_csv=labels, group_column="patient"))
    with pytest.raises(InvalidArgumentError, match="--group-column 'patient_id' names a column of the labels CSV"):
        CustomSpec(root, group_column="patient_id")  # class folders have no columns
    # without the flag the patient column is read as a label, and refused as one
    with pytest.raises(DataError, match="'patient_id' is 'p00'; labels are 0 or 1"):
        read_custom(CustomSpec(root, labels_csv=labels))


def _bad_csv(tmp_path: Path, text: str) -> Path:
    (tmp_path / "labels.csv").write_text(text)
    return tmp_path / "labels.csv"


@pytest.mark.parametrize("case", ["empty class folder", "unknown column", "label outside 0/1", "path outside root",
                                  "absolute path", "one class only", "missing file", "multi-label folders"])
def test_malformed_own_data_is_refused_before_anything_is_built(films, tiny_folder, tmp_path, case, monkeypatch):
    root, rows = films
    names = [p for p, _ in rows]
    args = ["--data-root", str(root)]
    if case == "empty class folder":
        folders = _class_folders(films, tmp_path / "films")
        (folders / "nodule").mkdir()
        args, expect = ["--data-root", str(folders)], ["nodule", "holds no image files"]
    elif case == "unknown column":
        args += ["--labels", str(_bad_csv(tmp_path, "path,effusion,age\n" + "".join(
            f"{n},{i % 2},{50 + i}\n" for i, n in enumerate(names))))]
        expect = ["labels.csv", "age", "0 or 1"]
    elif case == "label outside 0/1":
        body = "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)).replace(f"{names[5]},1", f"{names[5]},2")
        args += ["--labels", str(_bad_csv(tmp_path, "path,effusion\n" + body))]
        expect = ["labels.csv:7", "'2'", "0 or 1"]
    elif case == "path outside root":
        body = "".join(f"{n},{i % 2}\n" for i, n in enumerate(names[:-1])) + "../../../../etc/hostname,1\n"
        args += ["--labels", str(_bad_csv(tmp_path, "path,effusion\n" + body))]
        expect = [f"labels.csv:{len(names) + 1}", "climbs out of the data root"]
    elif case == "absolute path":
        body = "/etc/hostname,a\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names))
        args += ["--labels", str(_bad_csv(tmp_path, "path,label\n" + body))]
        expect = ["labels.csv:2", "absolute path"]
    elif case == "one class only":
        args += ["--labels", str(_bad_csv(tmp_path, "path,label\n" + "".join(f"{n},normal\n" for n in names)))]
        expect = ["labels.csv", "'normal'", "two or more classes"]
    elif case == "missing file":
        body = "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)) + "films/nowhere.png,1\n"
        args += ["--labels", str(_bad_csv(tmp_path, "path,effusion\n" + body))]
        expect = [f"labels.csv:{len(names) + 2}", "films/nowhere.png", "does not exist"]
    else:
        args = ["--data-root", str(_class_folders(films, tmp_path / "films")), "--label-type", "multi-label"]
        expect = ["--label-type multi-label", "labels CSV"]

    def no_model(*a, **k):  # nothing may be built before the data is checked
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(ecamp, "load", no_model)
    out = tmp_path / "run"
    from ecamp.train.downstream.custom import finetune_custom

    with pytest.raises((DataError, InvalidArgumentError)) as e:
        spec_args = dict(zip(args[::2], args[1::2], strict=True))
        finetune_custom(CustomSpec(Path(spec_args["--data-root"]),
                                   labels_csv=Path(spec_args["--labels"]) if "--labels" in spec_args else None,
                                   label_type=spec_args.get("--label-type", "auto")),
                        100, out, model_name=f"local-dir:{tiny_folder}", num_workers=0, progress=False)
    message = str(e.value)
    for part in expect:
        assert part in message, message
    assert not (out / "best").exists()


def test_calibration_and_operating_points_on_overconfident_logits():
    rng = np.random.default_rng(0)
    y = (rng.random((600, 3)) < [0.2, 0.5, 0.1]).astype(np.float32)
    logits = ((y * 2 - 1) + rng.normal(size=y.shape)) * 4 + 1  # right ranking, far too sure, shifted
    fitted = fit(logits[:300], y[:300], multilabel=True)
    test = report(fitted, logits[300:], y[300:], multilabel=True, labels=["a", "b", "c"])
    assert fitted.calibration.method == "platt" and test["ece_after"] < test["ece_before"] / 2
    sens = fit(logits[:300], y[:300], multilabel=True, rule="sensitivity=0.9")
    val = report(sens, logits[:300], y[:300], multilabel=True, labels=["a", "b", "c"])
    assert all(v["sensitivity"] >= 0.9 for v in val["per_label"].values())
    spec = fit(logits[:300], y[:300], multilabel=True, rule="specificity=0.95")
    val = report(spec, logits[:300], y[:300], multilabel=True, labels=["a", "b", "c"])
    assert all(v["specificity"] >= 0.95 for v in val["per_label"].values())
    with pytest.raises(InvalidArgumentError, match="sensitivity=X"):
        fit(logits, y, multilabel=True, rule="sensitivity=1.5")
    classes = rng.integers(0, 3, (600, 1))
    sharp = (np.eye(3)[classes[:, 0]] + rng.normal(size=(600, 3))) * 6
    one = fit(sharp[:300], classes[:300], multilabel=False)
    assert one.calibration.method == "temperature" and len(one.calibration.scale) == 1
    assert one.calibration.scale[0] < 1  # a temperature above 1 softens the over-confident softmax
    test = report(one, sharp[300:], classes[300:], multilabel=False, labels=["a", "b", "c"])
    assert test["ece_after"] < test["ece_before"] / 2 and test["brier_after"] < test["brier_before"]


def _site_rows(root: Path, prefix: str) -> list[tuple[str, int]]:
    rows = []
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        for line in (root / name).read_text().splitlines():
            if line.strip():
                path, effusion, *_ = line.split()
                rows.append((f"{prefix}/{path}", int(float(effusion))))
    return rows


def test_calibration_on_another_sites_films_repairs_an_overconfident_model(tiny_folder, tmp_path):
    """Trained on one site's uniform films, validated and tested on another site's varied ones: the model is too
    sure of itself there (the fitted temperature scale is below 1), and calibrating on that site's validation films
    lowers the test ECE. Nothing here is built to come out that way: the scale and both ECEs are fitted and measured."""
    site_a = write_phantom_classification(tmp_path / "a", 200, seed=11, size=64, variation=0.0)
    site_b = write_phantom_classification(tmp_path / "b", 300, seed=12, size=64, variation=1.0)
    labels = tmp_path / "sites.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label"])
        w.writerows([[p, "train", "effusion" if y else "clear"] for p, y in _site_rows(site_a, "a")])
        w.writerows([[p, "val" if i % 2 else "test", "effusion" if y else "clear"]
                     for i, (p, y) in enumerate(_site_rows(site_b, "b"))])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("head: cls\nmode: finetune\nsteps: 600\nlr: 0.002\nwarmup: 20\nbatch_size: 32\n"
                      "optimizer: adamw\nweight_decay: 0.0\npatience: 0\neval_every: 600\n")
    run = tmp_path / "run"
    assert train_main(["finetune", "--dataset", "custom", "--labels", str(labels), "--data-root", str(tmp_path),
                       "--config", str(recipe), "--output-dir", str(run), "--model", f"local-dir:{tiny_folder}",
                       "--num-workers", "0", "--no-progress", "--seed", "1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val (150 images)"
    assert ecamp.load(f"local-dir:{run / 'best'}").ecamp_cfg.calibration.scale[0] < 1  # over-confident there
    assert cal["test_ece_after"] < cal["test_ece_before"]
    assert cal["test_brier_after"] < cal["test_brier_before"]


def test_predict_refuses_a_calibration_of_the_wrong_size_before_reading(tiny_folder, tmp_path):
    clf = ecamp.load(f"local-dir:{tiny_folder}", num_classes=2)
    ecamp.save_pretrained(clf, tmp_path / "clf", label_names=["a", "b"], ecamp_cfg={
        "task": "classification", "activation": "sigmoid",
        "calibration": {"method": "platt", "scale": [1.0, 1.0, 1.0], "bias": [0.0, 0.0, 0.0]}})
    with pytest.raises(ConfigError, match="3 values for its 2 outputs"):
        ecamp.predict.predict_files(ecamp.load(f"local-dir:{tmp_path / 'clf'}"), ["never-read.png"],
                                    tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_own_class_folders_under_two_processes(films, tiny_folder, tmp_path):
    import os
    import subprocess
    import sys

    data_root = _class_folders(films, tmp_path / "films")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ecamp.train", "finetune", "--dataset", "custom", "--data-root", str(data_root),
                          "--output-dir", str(tmp_path / "ddp"), "--model", f"local-dir:{tiny_folder}",
                          "--max-steps", "8", "--batch-size", "16", "--eval-every", "4", "--mode", "linear-probe",
                          "--num-workers", "0", "--no-progress", "--class-weights", "auto"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    run = tmp_path / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    split = _read(run / "splits.csv")
    assert len(split) == 120 and metrics["data"]["counts"]["val"]["images"] == sum(r["split"] == "val" for r in split)
    # the two ranks gathered the whole validation split: refitting on it in one process gives the stored values
    best = ecamp.load(f"local-dir:{run / 'best'}")
    val = [r for r in split if r["split"] == "val"]
    tf = ecamp.get_transform(best)
    with torch.no_grad():
        z = best(torch.stack([tf(str(data_root / r["path"])) for r in val])).numpy()
    y = np.array([[best.label_names.index(r["label"])] for r in val])
    refit = fit(z, y, multilabel=False)
    stored = best.ecamp_cfg
    if stored.calibration is not None:
        assert stored.calibration.scale[0] == pytest.approx(refit.calibration.scale[0], rel=1e-4)
    np.testing.assert_allclose(stored.operating_points.raw_thresholds, refit.points.raw_thresholds, rtol=1e-5)
