"""Downstream classification: list-file readers, phantom fine-tuning and linear probing, dense-feature helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ecamp
from ecamp.errors import EcampError
from ecamp.finetune import FeaturePyramid, LinearProbe, layer_decay_param_groups, multiscale_features
from ecamp.train.common.lists import list_file_for
from ecamp.train.downstream.classification import TASKS, read_list_file, write_splits
from ecamp.train.downstream.recipes import RECIPES, load_preset, preset_text, recipe
from ecamp.train.phantom import write_phantom_classification
from ecamp.train.pretrain.data import DataError

REPO = Path(__file__).resolve().parent.parent


def test_list_files_in_the_authors_formats(tmp_path):
    (tmp_path / "nih.txt").write_text("images/a.png 0 1 0 0 0 0 0 0 0 0 0 0 0 1 \nimages/b.png " + "0 " * 14 + "\n")
    rows = read_list_file(tmp_path / "nih.txt", TASKS["chestx-ray14"])
    assert [r[0] for r in rows] == ["images/a.png", "images/b.png"] and rows[0][1].tolist()[1] == 1
    (tmp_path / "covid.txt").write_text("x.png 2\ny.png 0 1 0\n")
    rows = read_list_file(tmp_path / "covid.txt", TASKS["covidx"])
    assert [r[1].tolist() for r in rows] == [[2.0], [1.0]]
    (tmp_path / "bad.txt").write_text("x.png 1 0\n")
    with pytest.raises(DataError, match="bad.txt:1: expected 14 labels"):
        read_list_file(tmp_path / "bad.txt", TASKS["chestx-ray14"])
    (tmp_path / "bad2.txt").write_text("x.png yes\n")
    with pytest.raises(DataError, match="numbers"):
        read_list_file(tmp_path / "bad2.txt", TASKS["rsna"])
    with pytest.raises(DataError, match="does not exist"):
        read_list_file(tmp_path / "missing.txt", TASKS["rsna"])
    assert list_file_for("train", 1) == "train_list_1.txt" and list_file_for("train", 100) == "train_list.txt"
    counts = write_splits([(f"{i}.png", [i % 2]) for i in range(1000)], tmp_path / "splits", seed=0)
    assert counts == {"test_list.txt": 200, "val_list.txt": 100, "train_list.txt": 700, "train_list_10.txt": 70,
                      "train_list_1.txt": 7}
    one = (tmp_path / "splits" / "train_list_1.txt").read_text().split("\n")[:7]
    assert set(one) <= set((tmp_path / "splits" / "train_list_10.txt").read_text().split("\n"))


@pytest.fixture(scope="module")
def phantom_cls(tmp_path_factory):
    # variation=0: films alike apart from their findings, so a short fine-tune from random init must learn them
    return write_phantom_classification(tmp_path_factory.mktemp("cls"), 400, seed=11, size=128, variation=0.0)


def test_finetune_on_phantom_beats_chance(phantom_cls, tiny_folder, tmp_path):
    out = subprocess.run([sys.executable, "-m", "ecamp.train", "finetune", "--dataset", "phantom", "--fraction",
                          "100", "--data-root", str(phantom_cls), "--output-dir", str(tmp_path / "ft"), "--model",
                          f"local-dir:{tiny_folder}", "--max-steps", "150", "--lr", "0.03", "--batch-size", "32",
                          "--warmup", "10", "--num-workers", "0", "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["task"] == "phantom" and metrics["steps"] == 150 and len(metrics["test_per_class"]) == 4
    assert metrics["test_auroc"] > 0.65, metrics


def test_linear_probe_leaves_the_trunk_unchanged(phantom_cls, tiny_folder, tmp_path):
    from ecamp.train.downstream.classification import finetune_classification

    probe = LinearProbe(ecamp.load(f"local-dir:{tiny_folder}", drop_path_rate=0.5), 4)
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    probe.train()
    assert not probe.encoder.training and probe.head.training  # no drop-path or dropout in the frozen trunk
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    opt = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 2, (8, 4)).float()
    head_before = probe.head.weight.clone()
    for _ in range(5):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(probe.head.weight, head_before)
    for k, v in probe.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(probe.features(x), probe.features(x))  # deterministic: eval mode despite drop-path
    r = recipe("cls", "phantom", 10, "linear-probe").replace(steps=20, lr=0.05, batch_size=8, warmup=2)
    metrics = finetune_classification("phantom", 10, phantom_cls, tmp_path / "lp", mode="linear-probe", recipe=r,
                                      model_name=f"local-dir:{tiny_folder}", num_workers=0, progress=False)
    assert 0 <= metrics["test_auroc"] <= 1 and metrics["mode"] == "linear-probe" and metrics["steps_run"] == 20


def test_dense_features_and_layer_decay(tiny_folder):
    model = ecamp.load(f"local-dir:{tiny_folder}")
    x = torch.randn(2, 3, 64, 64)
    maps = multiscale_features(model, x, indices=(0, 1), scales=(2.0, 0.5))
    assert [tuple(m.shape) for m in maps] == [(2, 48, 8, 8), (2, 48, 2, 2)]
    pyr = FeaturePyramid(48, 32)(maps[1].new_zeros(2, 48, 4, 4))
    assert [tuple(p.shape) for p in pyr] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    groups = layer_decay_param_groups(ecamp.load(f"local-dir:{tiny_folder}", num_classes=3), 1e-3, layer_decay=0.5)
    lrs = sorted({round(g["lr"], 8) for g in groups})
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5**3)
    assert np.isclose(sum(len(g["params"]) for g in groups), len(list(model.parameters())) + 2)


def test_model_selection_stays_off_the_test_set(tmp_path):
    from ecamp.train.downstream.classification import select_validation

    task = TASKS["chexpert"]
    lines = [f"img{i}.png 1 0 0 0 1" for i in range(40)]
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        (tmp_path / name).write_text("\n".join(lines[:30] if name == "train_list.txt" else lines[30:]) + "\n")
    rows = {s: read_list_file(tmp_path / f"{s}_list.txt", task) for s in ("train", "val", "test")}
    # the authors' CheXpert lists: val equals test; without test_list_600 a seeded tenth of train validates
    held, note = select_validation(rows, tmp_path, "chexpert", task, authors=False, seed=0)
    assert len(held["val"]) == 3 and len(held["train"]) == 27 and "10 %" in note
    assert not {r[0] for r in held["val"]} & ({r[0] for r in held["train"]} | {r[0] for r in held["test"]})
    assert held["val"] == select_validation(rows, tmp_path, "chexpert", task, authors=False, seed=0)[0]["val"]
    (tmp_path / "test_list_600.txt").write_text("official0.png 0 1 0 0 0\nofficial1.png 1 0 0 0 0\n")
    official, note = select_validation(rows, tmp_path, "chexpert", task, authors=False, seed=0)
    assert [r[0] for r in official["test"]] == ["official0.png", "official1.png"] and official["val"] == rows["val"]
    same, note = select_validation(rows, tmp_path, "chexpert", task, authors=True, seed=0)
    assert same == rows and note.startswith("authors")


def test_presets_match_the_authors_tables_and_load(tmp_path):
    files = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
    assert len(files) == len(RECIPES) == 36  # 24 classification, 9 segmentation, 3 detection rows
    for key in RECIPES:
        head, task, fraction, mode = key
        path = REPO / "configs" / "finetune" / f"{head}_{task}_{fraction}_{mode}.yaml"
        assert path.read_text() == preset_text(key), f"{path.name} is stale: regenerate it with preset_text"
        run, values = load_preset(path)
        assert run == {"head": head, "dataset": task, "fraction": fraction, "mode": mode}
        assert recipe(head, task, fraction, mode).replace(**values) == RECIPES[key]
    assert recipe("cls", "chexpert", 100, "linear-probe").batch_size == 4096
    assert recipe("det", "rsna", 100).expansion == 4 and recipe("seg", "riga", 1).batch_size == 5
    assert recipe("cls", "mured", 10) == recipe("cls", "chestx-ray14", 10)  # no published fundus settings
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(EcampError, match="lr: expected a number"):
        load_preset(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(EcampError, match="unknown keys"):
        load_preset(tmp_path / "typo.yaml")
    with pytest.raises(EcampError, match="classification only"):
        recipe("seg", "siim", 1, "linear-probe")


def test_finetune_from_a_preset_file(phantom_cls, tiny_folder, tmp_path):
    (tmp_path / "p.yaml").write_text("head: cls\ndataset: phantom\nfraction: 100\nmode: linear-probe\nsteps: 6\n"
                                     "lr: 0.05\nwarmup: 1\nbatch_size: 16\neval_every: 3\npatience: 1\n")
    out = subprocess.run([sys.executable, "-m", "ecamp.train", "finetune", "--config", str(tmp_path / "p.yaml"),
                          "--data-root", str(phantom_cls), "--output-dir", str(tmp_path / "run"), "--model",
                          f"local-dir:{tiny_folder}", "--num-workers", "0", "--no-progress", "--lr", "0.01"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mode"] == "linear-probe" and metrics["steps"] == 6
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [3, 6] and logged[0]["lr"] < 0.01


def test_two_process_finetuning_gathers_the_whole_evaluation(phantom_cls, tiny_folder, tmp_path):
    import os

    from sklearn.metrics import roc_auc_score

    from ecamp.train.downstream.classification import ListDataset

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ecamp.train", "finetune", "--dataset", "phantom", "--mode", "linear-probe",
                          "--data-root", str(phantom_cls), "--output-dir", str(tmp_path / "ddp"), "--model",
                          f"local-dir:{tiny_folder}", "--max-steps", "8", "--batch-size", "16", "--lr", "0.05",
                          "--warmup", "1", "--eval-every", "4", "--num-workers", "0", "--no-progress"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert len([ln for ln in out.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 reports
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    # the best weights, scored on the whole test list in one process, give the number the two ranks gathered
    best = ecamp.load(f"local-dir:{tmp_path / 'ddp' / 'best'}")  # the probe, written as the timm model it equals
    rows = read_list_file(phantom_cls / "test_list.txt", TASKS["phantom"])
    ds = ListDataset(phantom_cls, rows, ecamp.get_transform(best))
    with torch.no_grad():
        logits = torch.cat([best(x) for x, _ in torch.utils.data.DataLoader(ds, batch_size=64)]).numpy()
    y = np.stack([r[1] for r in rows])
    expected = np.mean([roc_auc_score(y[:, c], logits[:, c]) for c in range(4)])
    assert metrics["test_auroc"] == pytest.approx(expected, abs=1e-6)
    assert best.ecamp_cfg.finetune["step"] == metrics["best_step"] and len(rows) == 80


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_classification_reader(name, tmp_path):
    task = TASKS[name]
    if task.multilabel:  # the authors' lines: path, C labels, sometimes a trailing space
        good = "img/a.png " + " ".join(["0"] * (task.num_classes - 1) + ["1"]) + " \n"
        bad = "img/b.png " + " ".join(["0"] * (task.num_classes + 1)) + "\n"
        expected = [0.0] * (task.num_classes - 1) + [1.0]
    else:  # a class index, or C one-hot labels
        good = f"img/a.png {task.num_classes - 1}\n"
        bad = f"img/b.png {task.num_classes}\n"
        expected = [float(task.num_classes - 1)]
    (tmp_path / "l.txt").write_text(good + "\n")
    assert [(p, y.tolist()) for p, y in read_list_file(tmp_path / "l.txt", task)] == [("img/a.png", expected)]
    (tmp_path / "bad.txt").write_text(good + bad)
    with pytest.raises(DataError, match="bad.txt:2"):
        read_list_file(tmp_path / "bad.txt", task)
