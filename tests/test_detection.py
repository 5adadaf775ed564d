"""Downstream detection: the RSNA box lists, the YOLOv3 target/decode round trip, the metric protocols, phantom
training."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import ecamp
from ecamp.train.downstream.detection import (
    DetectionModel,
    decode,
    finetune_detection,
    mean_average_precision,
    postprocess,
    read_box_list,
    yolo_loss,
)
from ecamp.train.downstream.recipes import recipe
from ecamp.train.phantom import write_phantom_detection
from ecamp.train.pretrain.data import DataError


def test_box_lists_in_the_authors_format(tmp_path):
    (tmp_path / "l.csv").write_text('image_path,bbox\na.png,"[[10, 20, 30, 60], [1, 2, 3, 4]]"\n'
                                    'b.png,"[[0, 0, 0, 0]]"\nc.png,"[[5.5, 6, 7, 8.25]]"\n')
    rows = read_box_list(tmp_path / "l.csv")
    assert [r[0] for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[0][1].tolist() == [[10, 20, 30, 60], [1, 2, 3, 4]] and rows[1][1].shape == (0, 4)
    assert rows[2][1].tolist() == [[5.5, 6, 7, 8.25]]
    (tmp_path / "bad.csv").write_text('image_path,bbox\na.png,"[[1, 2, 3]]"\n')
    with pytest.raises(DataError, match=r"bad.csv:2: bbox is not a list"):
        read_box_list(tmp_path / "bad.csv")
    (tmp_path / "evil.csv").write_text('image_path,bbox\na.png,__import__("os").system("false")\n')
    with pytest.raises(DataError, match="evil.csv:2"):
        read_box_list(tmp_path / "evil.csv")
    (tmp_path / "cols.csv").write_text("path,boxes\na.png,[]\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \[.image_path., .bbox.\]"):
        read_box_list(tmp_path / "cols.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_box_list(tmp_path / "missing.csv")


def _model(tiny_folder, **kw) -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(ecamp.load(f"local-dir:{tiny_folder}"), widths=(16, 32, 64), head_width=16, **kw)


def _encode(model: DetectionModel, box: torch.Tensor) -> list[torch.Tensor]:
    """Raw output maps that predict exactly ``box`` (normalised x1, y1, x2, y2) at the anchor the loss assigns."""
    size, outputs = model.img_size, []
    g = model.grid[0]
    for k, (cells, anchors) in enumerate(zip((g // 2, g, 2 * g), model.anchors, strict=True)):
        raw = torch.full((1, 3, cells, cells, 6), -12.0)  # objectness ~ 6e-6 everywhere else
        cx, cy = (box[0] + box[2]) / 2 * cells, (box[1] + box[3]) / 2 * cells
        w, h = (box[2] - box[0]) * size, (box[3] - box[1]) * size
        if k == 1:  # put the object on the middle scale only
            a = min(range(3), key=lambda i: abs(math.log(w / anchors[i][0])) + abs(math.log(h / anchors[i][1])))
            gi, gj = int(cx), int(cy)
            logit = lambda v: math.log(v / (1 - v))  # noqa: E731
            raw[0, a, gj, gi] = torch.tensor([logit(cx - gi), logit(cy - gj), math.log(w / anchors[a][0]),
                                              math.log(h / anchors[a][1]), 12.0, 12.0])
        outputs.append(raw.permute(0, 1, 4, 2, 3).reshape(1, 18, cells, cells))
    return outputs


def test_decode_inverts_the_targets_and_the_metric_scores_it(tiny_folder):
    model = _model(tiny_folder)
    box = torch.tensor([0.30, 0.40, 0.55, 0.62])
    outputs = _encode(model, box)
    dets = postprocess(decode(outputs, model.anchors, model.img_size))
    assert len(dets[0]["boxes"]) == 1
    assert torch.allclose(dets[0]["boxes"][0] / model.img_size, box, atol=1e-4)
    truth = [{"boxes": box[None] * model.img_size, "labels": torch.zeros(1, dtype=torch.long)}]
    assert mean_average_precision(dets, truth) == pytest.approx(1.0)
    # the loss prefers the right answer to the same maps with the box moved away
    wrong = _encode(model, torch.tensor([0.05, 0.05, 0.2, 0.15]))
    assert yolo_loss(outputs, [box[None]], model.anchors, model.img_size) < \
        yolo_loss(wrong, [box[None]], model.anchors, model.img_size)
    # the forward pass has the shapes the loss and decoder expect, and the encoder is frozen
    raw = model(torch.zeros(2, 3, model.img_size, model.img_size))
    assert [tuple(r.shape) for r in raw] == [(2, 18, g, g) for g in (2, 4, 8)]
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder.training and model.neck.training


def test_fixed_and_authors_metric_protocols():
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    hit = {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.zeros(1, dtype=torch.long)}
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    truth = {"boxes": box, "labels": torch.zeros(1, dtype=torch.long)}
    empty_truth = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    # a false positive on a film without boxes (scored higher than the hit) and a missed film
    fp = {"boxes": torch.tensor([[50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.95]),
          "labels": torch.zeros(1, dtype=torch.long)}
    preds, truths = [hit, fp, nothing], [truth, empty_truth, truth]
    assert mean_average_precision(preds, truths, authors=True) == pytest.approx(1.0)  # both ignored (#42)
    assert mean_average_precision(preds, truths) < 0.5
    # no film with a box and a prediction: the authors' torchmetrics scores the empty set -1, which their best
    # score of 0 never takes (D14); ecamp's default counts the misses and scores 0
    assert mean_average_precision([fp, nothing], [empty_truth, truth], authors=True) == -1.0
    assert mean_average_precision([fp, nothing], [empty_truth, truth]) == 0.0


@pytest.fixture(scope="module")
def phantom_det(tmp_path_factory):
    return write_phantom_detection(tmp_path_factory.mktemp("det"), 400, seed=3, size=128)


def test_phantom_detection_finds_the_boxes(phantom_det, tiny_folder, tmp_path):
    lines = (phantom_det / "test_list.csv").read_text().splitlines()
    assert lines[0] == "image_path,bbox" and len(lines) == 81
    assert any("[[0, 0, 0, 0]]" in ln for ln in lines) and any("[[0, 0, 0, 0]]" not in ln for ln in lines[1:])
    r = recipe("det", "phantom-det", 100).replace(steps=200, lr=2e-3, batch_size=16, warmup=10, eval_every=50,
                                                  start_eval=0)
    kw = dict(model_name=f"local-dir:{tiny_folder}", recipe=r, widths=(32, 64, 128), head_width=64,
              num_workers=0, progress=False)
    metrics = finetune_detection("phantom-det", 100, phantom_det, tmp_path / "run", **kw)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test_map"] == metrics["test_map"] and saved["expansion"] == 4
    # mAP over IoU 0.40-0.75 on all 80 test films, the 30 % without an effusion included; an untrained head
    # scores about 0
    assert metrics["test_map"] > 0.3, metrics
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [50, 100, 150, 200]
    assert {p.name for p in (tmp_path / "run" / "best").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    untrained = finetune_detection("phantom-det", 100, phantom_det, tmp_path / "u", **{**kw, "recipe": r.replace(
        steps=1, lr=1e-9)})
    assert untrained["test_map"] < 0.05 < metrics["test_map"] - 0.25


def test_finetune_det_cli_and_authors_protocol(phantom_det, tiny_folder, tmp_path):
    args = [sys.executable, "-m", "ecamp.train", "finetune", "--head", "det", "--dataset", "phantom-det",
            "--fraction", "10", "--data-root", str(phantom_det), "--model", f"local-dir:{tiny_folder}",
            "--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--no-progress"]
    out = subprocess.run([*args, "--output-dir", str(tmp_path / "fixed")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    fixed = json.loads(out.stdout.strip().splitlines()[-1])
    assert fixed["expansion"] == 8 and fixed["steps"] == 2 and fixed["protocol"].startswith("fixed")
    assert fixed["protocol_options"]["nms_iou_plus_one"] is False and fixed["precision"] == "fp32"
    # the authors' protocol tests on val_list.csv: it runs without a test list at all
    (phantom_det / "test_list.csv").rename(phantom_det / "held.csv")
    try:
        out = subprocess.run([*args, "--output-dir", str(tmp_path / "up"), "--authors-protocol"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        up = json.loads((tmp_path / "up" / "metrics.json").read_text())
        assert up["protocol"].startswith("authors")
        # the whole authors' set ran, and metrics.json says so
        from ecamp.train.downstream.protocol import authors_protocol

        assert up["protocol_options"] == authors_protocol("map").as_dict() and up["precision"] == "fp16"
        out = subprocess.run([*args, "--output-dir", str(tmp_path / "missing")], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 2 and "test_list.csv does not exist" in out.stderr
    finally:
        (phantom_det / "held.csv").rename(phantom_det / "test_list.csv")
    assert np.isfinite(fixed["test_map"])


def test_anchor_matching_uses_the_authors_pixel_iou():
    from ecamp.train.downstream.detection import _shape_iou

    gt, anchors = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0], [4.0, 2.0]])
    # plain IoU: 1/2 and 2/8; the YOLOv3 code's +1 convention: (2*2)/(3*2) and (3*2)/(5*3)
    assert torch.allclose(_shape_iou(gt, anchors, plus_one=False), torch.tensor([[0.5, 0.25]]))
    assert torch.allclose(_shape_iou(gt, anchors), torch.tensor([[4 / 6, 6 / 15]]))
