"""``ecamp demo``: report.md with its plots, the MIM+SR-only ablation, and the probes the report explains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ecamp
from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
from ecamp.train.demo import demo_config, probe_classifier, run_demo, write_report
from ecamp.train.downstream.probe import fit_linear_probe
from ecamp.train.phantom import FINDINGS, write_phantom

from helpers.builders import make_tiny_encoder, pretrain_batch


def _pngs(report: Path) -> list[Path]:
    return [report.parent / name for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def _table(report: Path) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in report.read_text().splitlines() if line.startswith("| ")
            for cells in [[c.strip(" *") for c in line.strip("|").split("|")]]}


def test_a_tiny_demo_with_the_ablation_writes_its_report(tmp_path):
    cfg = demo_config()
    cfg.optim.batch_size = 8
    lines: list[str] = []
    result = run_demo(tmp_path, n_pretrain=16, n_probe=60, max_steps=1, ablation=True, config=cfg,
                      progress=False, echo=lines.append)
    assert set(result["ablation"]) == set(FINDINGS) and result["steps"] == 1
    assert any("MIM+SR only AUROC" in line for line in lines)
    report = Path(result["report"])
    assert report == tmp_path / "report.md"
    table = _table(report)
    assert table["finding"] == ["pre-trained", "random init", "MIM+SR only"]
    for k in FINDINGS:  # the report's numbers are the run's
        assert table[k] == [f"{result[key][k]:.3f}" for key in ("pretrained", "random", "ablation")]
    pngs = _pngs(report)
    assert [p.name for p in pngs] == ["roc.png", "losses.png", "explain.png"]
    for png in pngs:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 600
    # the ablation is the same run without the reports' gradient: same data and draws, MLM weighted 0
    full, no_text = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                     for run in (tmp_path / "run", tmp_path / "no-text" / "run"))
    assert [r["mim_loss"] for r in full] == [r["mim_loss"] for r in no_text]
    assert no_text[0]["loss"] == pytest.approx(no_text[0]["mim_loss"] + no_text[0]["sr_loss"])
    assert full[0]["loss"] > no_text[0]["loss"]
    assert json.loads((tmp_path / "no-text" / "run" / "config.json").read_text())["model"]["mlm_weight"] == 0


def test_without_matplotlib_the_report_says_what_to_install(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), np.tile([0, 1], 20)
    probes = {"pre-trained": {"nodule": fit_linear_probe(x[:20], y[:20], x[20:], y[20:])}}
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    report = write_report(tmp_path, probes=probes, labels={"nodule": y}, files=[f"{i}.png" for i in range(40)],
                          runs={}, encoders={}, steps=3, n_pretrain=10, seed=0)
    text = report.read_text()
    assert text.count('pip install "ecamp[plot]"') == 3 and "![" not in text
    assert _table(report)["nodule"] == [f"{probes['pre-trained']['nodule'].auroc:.3f}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_the_probe_classifier_is_the_probe(tmp_path):
    folder = write_phantom(tmp_path, 40, seed=2, size=64)
    files = sorted(str(p) for p in (folder / "images").iterdir())
    encoder = make_tiny_encoder()
    emb = ecamp.embed(encoder, files, progress=False)
    y = {"a": np.tile([0, 1], 20), "b": np.repeat([0, 1], 20)}
    fits = {k: fit_linear_probe(emb, v, emb, v) for k, v in y.items()}
    clf = probe_classifier(encoder, fits)
    with torch.no_grad():
        probs = torch.sigmoid(clf(ecamp.get_transform(encoder)(files))).numpy()
    for j, fit in enumerate(fits.values()):
        np.testing.assert_allclose(probs[:, j], fit.scores, atol=1e-5)
    assert clf.pretrained_cfg["label_names"] == ["a", "b"] and encoder.num_classes == 0


@pytest.mark.parametrize("mlm_weight", [0.0, 1.0])
def test_with_mlm_weight_0_the_reports_do_not_reach_the_encoder(mlm_weight):
    """What the ablation relies on: the image losses never read the text, so with the MLM term weighted 0 the
    encoder's gradient does not depend on the report at all (and with weight 1 it does)."""
    cfg = ECAMPPretrainConfig.tiny(mlm_weight=mlm_weight)
    torch.manual_seed(0)
    model = ECAMPPretrainModel(cfg).train()
    batch = pretrain_batch(cfg)
    other = dict(batch, input_ids=torch.randint(5, cfg.vocab_size, batch["input_ids"].shape),
                 weights=torch.rand(batch["weights"].shape) + 0.5)
    noise = torch.rand(batch["image"].shape[0], cfg.grid ** 2, generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for b in (batch, other):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout draws
        out = model(b, noise=noise)
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None})
        losses.append((out["mim_loss"], out["sr_loss"]))
    assert losses[0] == losses[1]
    same = all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert same is (mlm_weight == 0)


@pytest.mark.slow
def test_the_full_demo_with_the_ablation(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ecamp", "demo", "--ablation", "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=7200)
    assert out.returncode == 0, out.stdout + out.stderr
    mean = [line.split() for line in out.stdout.splitlines() if line.startswith("mean")][0]
    assert len(mean) == 4 and float(mean[1]) > float(mean[2]) + 0.05
    report = tmp_path / "report.md"
    assert _table(report)["finding"] == ["pre-trained", "random init", "MIM+SR only"]
    assert all(p.is_file() for p in _pngs(report)) and len(_pngs(report)) == 3
