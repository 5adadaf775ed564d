"""The downstream protocol options: each has its documented effect, --authors-protocol sets the authors' whole
set, the docs table names every option, and bad lists stop a run before its first step."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ecamp
from ecamp.errors import DataError, InvalidArgumentError
from ecamp.train.common.distributed import setup_runtime
from ecamp.train.common.lists import check_paths
from ecamp.train.downstream.loop import train_head
from ecamp.train.downstream.protocol import Protocol, authors_protocol, parse_protocol_options, resolve_protocol
from ecamp.train.downstream.recipes import Recipe

REPO = Path(__file__).resolve().parent.parent
CFG = {"input_size": (3, 32, 32), "mean": (0.4722,) * 3, "std": (0.3028,) * 3}


class _Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.w * x


def _train(tmp_path, scores=None, n=10, **kw):
    """train_head on a one-parameter model; returns (summary, logged rows, final w)."""
    model = _Scalar()
    data = torch.utils.data.TensorDataset(torch.ones(n))
    calls = iter(scores) if scores is not None else None
    recipe = Recipe(kw.pop("steps", 6), kw.pop("lr", 0.1), kw.pop("warmup", 1), kw.pop("batch_size", 4),
                    patience=kw.pop("patience", 0), eval_every=kw.pop("eval_every", None),
                    start_eval=kw.pop("start_eval", 0))
    summary = train_head(model, data, lambda net, b, dev: net(b[0].to(dev)).sum(),
                         (lambda: next(calls)) if calls else (lambda: 0.5), recipe, setup_runtime("cpu"),
                         tmp_path, metric="m", num_workers=0, progress=False, protocol=Protocol(**kw))
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, float(model.w.detach())


def _authors_lrs(peak: float, warmup: int, total: int) -> list[float]:
    """The authors' learning rate at steps 1..total: their WarmupCosineSchedule (Classification/utils/
    scheduler.py:36-40, a LambdaLR) stepped before optimizer.step() (train.py:462-463), so step k runs at
    lr_lambda(k), written out."""
    def lr_lambda(step):
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    return [peak * lr_lambda(k) for k in range(1, total + 1)]


def _lrs_used(monkeypatch, tmp_path, **kw) -> list[float]:
    """The learning rate of every optimizer step of a train_head run."""
    used, step = [], torch.optim.SGD.step

    def recording(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    _train(tmp_path, **kw)
    monkeypatch.undo()
    return used


def test_drop_last_changes_the_steps_per_epoch(tmp_path):
    # 10 samples, batch 4: the authors' loader has 3 batches per epoch (the last of 2), a dropping one 2
    _, kept, _ = _train(tmp_path / "keep", steps=6)
    _, dropped, _ = _train(tmp_path / "drop", steps=6, drop_last=True)
    assert [r["step"] for r in kept] == [3, 6] and [r["step"] for r in dropped] == [2, 4, 6]


def test_save_on_tie_and_strict_start_eval(tmp_path):
    tie, _, _ = _train(tmp_path / "tie", scores=[0.5, 0.5, 0.5], steps=6, eval_every=2, drop_last=True)
    strict, _, _ = _train(tmp_path / "strict", scores=[0.5, 0.5, 0.5], steps=6, eval_every=2, save_on_tie=False)
    assert tie["best_step"] == 6 and strict["best_step"] == 2
    # start_eval=2: the authors' `step > start_eval` first validates at 4, `>=` at 2
    _, later, _ = _train(tmp_path / "gt", steps=6, eval_every=2, start_eval=2)
    _, sooner, _ = _train(tmp_path / "ge", steps=6, eval_every=2, start_eval=2, start_eval_strict=False)
    assert [r["step"] for r in later] == [4, 6] and [r["step"] for r in sooner] == [2, 4, 6]


def test_authors_learning_rate_at_every_step(monkeypatch, tmp_path):
    # warm-up 4, peak 3e-2, 8 steps: the authors run 0.0075, 0.015, 0.0225, 0.03, then the cosine at k (their last
    # step at 0); ecamp's default the same warm-up, then the cosine one step later (the peak twice, no step at 0)
    kw = dict(steps=8, lr=3e-2, warmup=4, batch_size=1, n=1)
    authors = _lrs_used(monkeypatch, tmp_path / "authors", scheduler_before_optimizer=True, **kw)
    default = _lrs_used(monkeypatch, tmp_path / "default", **kw)
    theirs = _authors_lrs(3e-2, 4, 8)
    assert theirs[:4] == pytest.approx([0.0075, 0.015, 0.0225, 0.03]) and theirs[-1] == 0.0
    assert authors == theirs  # bit for bit
    assert default[:4] == theirs[:4] and default[4:] == pytest.approx([3e-2, *theirs[4:-1]])
    assert default[4:] != pytest.approx(theirs[4:])


def test_best_starts_at_zero(tmp_path):
    # D14: accuracy 0, 0, 0.5 with strict saving (train.py:492): the authors' best starts at 0, so the first two are
    # not saved and count towards patience; ecamp's -inf selects the first
    theirs, _, _ = _train(tmp_path / "zero", scores=[0.0, 0.0, 0.5], steps=6, eval_every=2, save_on_tie=False,
                          best_starts_at_zero=True, patience=3)
    ours, _, _ = _train(tmp_path / "inf", scores=[0.0, 0.0, 0.5], steps=6, eval_every=2, save_on_tie=False,
                        patience=2)
    assert theirs["best_step"] == 6 and ours["best_step"] == 6
    # patience 2 on accuracy 0 throughout: the authors stop one validation earlier, with nothing saved
    ours, rows, _ = _train(tmp_path / "p-inf", scores=[0.0] * 5, steps=10, eval_every=2, save_on_tie=False,
                           patience=2)
    assert ours["best_step"] == 2 and [r["step"] for r in rows] == [2, 4, 6]
    with pytest.raises(DataError, match=r"(?s)None of the 2 validation m scores was above 0.*train.py:418.*"
                                        r"best_starts_at_zero=false"):
        _train(tmp_path / "p-zero", scores=[0.0] * 5, steps=10, eval_every=2, save_on_tie=False, patience=2,
               best_starts_at_zero=True)
    rows = [json.loads(ln) for ln in (tmp_path / "p-zero" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and not (tmp_path / "p-zero" / "best").exists()
    # ties save (AUROC, train.py:484 `<=`): a first score of exactly 0 is saved from 0 too
    tie, _, _ = _train(tmp_path / "tie0", scores=[0.0, 0.0, 0.0], steps=6, eval_every=2, best_starts_at_zero=True)
    assert tie["best_step"] == 6


def test_replay_selection_is_the_loops_rule(tmp_path):
    from ecamp.train.downstream.loop import replay_selection

    scores = [0.0, 0.5, 0.5, 0.2, 0.1]
    for i, proto in enumerate((Protocol(), authors_protocol("accuracy"), authors_protocol("auroc"))):
        kw = dataclasses.asdict(proto)
        summary, rows, _ = _train(tmp_path / str(i), scores=scores, steps=10, eval_every=2, patience=2, **kw)
        picked, ran = replay_selection(scores, proto, 2)
        assert (rows[picked]["step"], len(rows)) == (summary["best_step"], ran)
    # strict from 0 (accuracy): the 0 is not saved and the tie is not either; ties from -inf: the second 0.5 wins
    assert replay_selection(scores, authors_protocol("accuracy"), 2) == (1, 4)
    assert replay_selection(scores, Protocol(), 2) == (2, 5)


def _cls_lists(data: Path, val: list[str]) -> None:
    for i in range(6):
        _png(data / f"img{i}.png", np.full((64, 64), 40 * i, np.uint8))
    (data / "train_list.txt").write_text("img0.png 1 0 1 0\nimg1.png 0 1 0 1\n")
    (data / "val_list.txt").write_text("".join(f"img{2 + i}.png {labels}\n" for i, labels in enumerate(val)))
    (data / "test_list.txt").write_text("img4.png 1 1 0 0\nimg5.png 0 0 1 1\n")


def test_auroc_undefined_class_stop_or_skip(tmp_path, tiny_folder):
    from ecamp.train.downstream.classification import finetune_classification

    # D15: no positive for nodule, no negative for cardiomegaly in the validation list
    data = tmp_path / "data"
    _cls_lists(data, ["1 0 1 0", "0 0 1 1"])
    r = Recipe(1, 0.01, 1, 2)
    kw = dict(model_name=f"local-dir:{tiny_folder}", recipe=r, num_workers=0, progress=False)
    with pytest.raises(DataError, match=r"(?s)validation rows \(2, from .*val_list.txt\) have no positive or no "
                                        r"negative for nodule, cardiomegaly.*scikit-learn 1.3.2.*ValueError"
                                        r".*auroc_undefined_class=skip") as e:
        finetune_classification("phantom", 100, data, tmp_path / "authors", authors_protocol=True, **kw)
    assert e.value.path == str(data / "val_list.txt") and not (tmp_path / "authors" / "metrics.jsonl").exists()
    skipped = finetune_classification("phantom", 100, data, tmp_path / "skip", authors_protocol=True,
                                      protocol={"auroc_undefined_class": "skip"}, **kw)
    assert skipped["protocol_options"]["auroc_undefined_class"] == "skip"
    metrics = finetune_classification("phantom", 100, data, tmp_path / "default", **kw)
    assert metrics["protocol_options"]["auroc_undefined_class"] == "skip"
    val = json.loads((tmp_path / "default" / "metrics.jsonl").read_text().splitlines()[0])["val_auroc"]
    assert math.isfinite(val)  # the mean over effusion and pneumothorax
    # the test list is checked too: every class is fine in validation, nodule has no negative in test
    _cls_lists(data, ["1 0 1 0", "0 1 0 1"])
    (data / "test_list.txt").write_text("img4.png 1 1 0 0\nimg5.png 0 1 1 1\n")
    with pytest.raises(DataError, match=r"(?s)test rows \(2, from .*test_list.txt\).* nodule: .*in test\(\)"):
        finetune_classification("phantom", 100, data, tmp_path / "authors-test", authors_protocol=True, **kw)


def test_auroc_of_float32_sigmoid_or_logits(tmp_path):
    from types import SimpleNamespace

    from ecamp.train.downstream.classification import ClassificationTask

    # positives at logits 5e-8 and 2, negatives at -3e-8 and 1e-8: the logits rank every positive first (AUROC 1),
    # while float32 sigmoid maps the three near-zero logits all to 0.5, a three-way tie (AUROC 0.75)
    logits = torch.tensor([[-3e-8], [1e-8], [5e-8], [2.0]])
    y = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    rows = [(f"{i}.png", y[i].numpy()) for i in range(4)]
    assert torch.equal(torch.sigmoid(logits[:3]), torch.full((3, 1), 0.5))

    def scored(protocol: Protocol) -> float:
        task = ClassificationTask("rsna", 100)
        run = SimpleNamespace(rows={"train": rows, "val": rows, "test": rows[::-1]}, lists=tmp_path, protocol=protocol,
                              seed=0, data_root=tmp_path, files={s: tmp_path / f"{s}.txt" for s in ("train", "val",
                                                                                                      "test")})
        task.prepare_rows(run)
        return task.score(task.predict(lambda x: logits, (torch.zeros(4), y), torch.device("cpu")))[0]

    assert scored(Protocol()) == 1.0
    assert scored(authors_protocol()) == 0.75 and authors_protocol().auroc_scores == "sigmoid-fp32"
    assert scored(Protocol(auroc_scores="sigmoid-fp32")) == 0.75


def test_yolo_class_loss_over_all_cells_or_positives():
    from ecamp.train.downstream.detection import yolo_loss

    anchors = [[(40.0, 40.0)] * 3, [(20.0, 20.0)] * 3, [(10.0, 10.0)] * 3]
    c = 0.3  # every class logit; one object, so each scale has exactly one positive anchor
    outputs = [torch.full((1, 18, g, g), c) for g in (2, 4, 8)]
    boxes = [torch.tensor([[0.2, 0.2, 0.5, 0.6]])]
    kw = dict(lambda_xy=0.0, lambda_wh=0.0, lambda_conf=0.0)
    pos = yolo_loss(outputs, boxes, anchors, 64, **kw)
    every = yolo_loss(outputs, boxes, anchors, 64, class_loss_over="all", **kw)
    bce = -math.log(1 / (1 + math.exp(-c)))
    assert float(pos) == pytest.approx(3 * bce, rel=1e-5)
    assert float(every) == pytest.approx(sum(bce / (3 * g * g) for g in (2, 4, 8)), rel=1e-5)


def test_nms_iou_plus_one():
    from ecamp.models.heads import postprocess

    # boxes 2 px wide, overlapping by 1: plain IoU 2/6, with every side one pixel longer 6/12 = the threshold
    det = torch.tensor([[[1.0, 1.0, 2.0, 2.0, 0.9, 1.0], [2.0, 1.0, 2.0, 2.0, 0.8, 1.0]]])
    assert len(postprocess(det, 0.5, 0.5)[0]["boxes"]) == 2
    kept = postprocess(det, 0.5, 0.5, iou_plus_one=True)[0]
    assert len(kept["boxes"]) == 1 and float(kept["scores"][0]) == pytest.approx(0.9)
    far = torch.tensor([[[1.0, 1.0, 2.0, 2.0, 0.9, 1.0], [9.0, 1.0, 2.0, 2.0, 0.8, 1.0]]])
    assert len(postprocess(far, 0.5, 0.5, iou_plus_one=True)[0]["boxes"]) == 2


def test_riga_loss_mean_of_two_or_pooled():
    from ecamp.train.downstream.segmentation import mixed_loss

    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, -3.0]]]])  # [1, 2 (disc, cup), 1, 2]
    target = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])

    def one(lg, t):  # 10 * focal(gamma 2) - log(soft Dice), written out
        p = torch.sigmoid(lg)
        bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
        focal = ((1 - torch.exp(-bce)) ** 2 * bce).mean()
        return 10 * focal - torch.log((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))

    two = mixed_loss(logits, target, per_output=True)
    assert float(two) == pytest.approx(float((one(logits[:, :1], target[:, :1]) + one(logits[:, 1:], target[:, 1:]))
                                             / 2), rel=1e-5)
    assert float(mixed_loss(logits, target)) == pytest.approx(float(one(logits, target)), rel=1e-5)
    assert abs(float(two) - float(mixed_loss(logits, target))) > 1e-3


def test_dense_tokens_raw_block_or_final_norm(tiny_folder):
    from ecamp.models.heads import DetectionModel, SegmentationModel

    enc = ecamp.load(f"local-dir:{tiny_folder}")
    x = torch.randn(2, 3, 64, 64)
    normed = SegmentationModel(enc).patch_tokens(x)
    raw = SegmentationModel(enc, dense_tokens="raw-block").patch_tokens(x)
    assert raw.shape == normed.shape == (2, 16, 48) and not torch.allclose(raw, normed, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(enc.norm(raw), normed, atol=1e-5)  # the same tokens, before and after the norm
    det = DetectionModel(enc, widths=(8, 16, 32), head_width=8, dense_tokens="raw-block")
    assert torch.equal(det.patch_tokens(x), raw)
    with pytest.raises(InvalidArgumentError, match="dense_tokens"):
        SegmentationModel(enc, dense_tokens="normed")


def test_siim_balance_negatives_is_seeded():
    from ecamp.train.downstream.segmentation import balance_negatives

    rows = [f"r{i}" for i in range(13)]
    positive = [i in (1, 5, 9) for i in range(13)]
    picked = balance_negatives(rows, positive, seed=0)
    assert len(picked) == 6 and {"r1", "r5", "r9"} <= set(picked) and picked == sorted(picked, key=rows.index)
    assert picked == balance_negatives(rows, positive, seed=0)
    assert {tuple(balance_negatives(rows, positive, seed=s)) for s in range(5)} != {tuple(picked)}
    assert balance_negatives(rows[:4], [True, True, True, False], seed=0) == rows[:4]  # fewer negatives: all


def _png(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.name


def test_mask_dataset_affine_p_interpolation_resize_and_rgb(tmp_path):
    from ecamp.train.downstream.segmentation import MaskDataset

    rng = np.random.default_rng(0)
    img = (rng.random((80, 80)) * 255).astype(np.uint8)
    _png(tmp_path / "i.png", img)
    mask = np.zeros((80, 80), np.uint8)
    mask[20:50, 30:60] = 255
    _png(tmp_path / "m.png", mask)
    rows = [("i.png", "m.png")]

    def sample(**kw):
        torch.manual_seed(3)
        return MaskDataset(tmp_path, rows, CFG, 1, train=kw.pop("train", True), **kw)[0]

    plain, _ = sample(train=False)
    assert torch.equal(sample(affine_p=0.0)[0], plain)  # never augmented
    assert not torch.equal(sample(affine_p=1.0)[0], plain)
    assert not torch.equal(sample(affine_p=1.0)[0], sample(affine_p=1.0, interpolation="nearest")[0])
    cv2, _ = sample(train=False, resize="linear-uint8")
    assert not torch.allclose(cv2, plain, atol=1e-3)
    levels = (cv2 * 0.3028 + 0.4722) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # 8-bit output, as cv2's
    colour = np.stack([img, 255 - img, img // 2], -1)
    _png(tmp_path / "c.png", colour)
    rows[0] = ("c.png", "m.png")
    grey, _ = sample(train=False)
    rgb, _ = sample(train=False, rgb=True)
    assert torch.equal(grey[0], grey[1]) and not torch.allclose(rgb[0], rgb[1])
    assert torch.allclose(rgb.mean(0), grey[0], atol=1e-4)


def test_authors_sets_every_option_and_options_parse():
    up, fixed = authors_protocol("auroc"), Protocol()
    assert resolve_protocol(None, True) == up and resolve_protocol({}, False) == fixed
    assert authors_protocol("accuracy").save_on_tie is False and up.save_on_tie is True  # train.py:492 vs :484
    assert up.precision == "fp16" and up.lp_head == "authors" and up.dense_tokens == "raw-block"
    changed = {k for k, v in up.as_dict().items() if v != fixed.as_dict()[k]}
    # the items where ecamp's default already is the authors' choice (docs/fidelity.md says why)
    assert set(fixed.as_dict()) - changed == {"drop_last", "save_on_tie", "start_eval_strict", "affine_p",
                                              "image_interpolation", "riga_loss"}
    opts = parse_protocol_options(["drop_last=true", "affine_p=0.25", "dense_tokens=raw-block"])
    assert opts == {"drop_last": True, "affine_p": 0.25, "dense_tokens": "raw-block"}
    one = resolve_protocol(opts, True)
    assert one == dataclasses.replace(up, drop_last=True, affine_p=0.25)
    with pytest.raises(InvalidArgumentError, match="unknown options"):
        resolve_protocol({"droplast": True}, False)
    with pytest.raises(InvalidArgumentError, match="dense_tokens: expected one of"):
        resolve_protocol({"dense_tokens": "normed"}, False)
    with pytest.raises(InvalidArgumentError, match="NAME=VALUE"):
        parse_protocol_options(["drop_last"])


def test_upstream_protocol_is_a_hidden_deprecated_alias(capsys):
    from ecamp.train.cli import build_parser

    parser = build_parser()
    base = ["finetune", "--data-root", "d", "--output-dir", "o"]
    assert parser.parse_args(base).authors_protocol is False and not capsys.readouterr().err
    assert parser.parse_args([*base, "--authors-protocol"]).authors_protocol is True
    assert parser.parse_args([*base, "--upstream-protocol"]).authors_protocol is True
    assert capsys.readouterr().err.strip().splitlines() == [
        "ecamp train finetune: warning: --upstream-protocol is deprecated; use --authors-protocol."]
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    shown = capsys.readouterr().out
    assert "--authors-protocol" in shown and "--upstream-protocol" not in shown


def test_fidelity_doc_names_every_option():
    text = (REPO / "docs" / "fidelity.md").read_text()
    section = text[text.index("## Downstream"):]
    section = section[:section.find("\n## ", 5)] if "\n## " in section[5:] else section
    for f in dataclasses.fields(Protocol):
        assert re.search(rf"`{f.name}`", section), f"docs/fidelity.md, Downstream: no row for {f.name}"
    for item in [f"D{k}" for k in range(1, 17)] + ["#35", "#38", "#39", "#43", "#45", "#46"]:
        assert re.search(rf"(?<![\w#]){re.escape(item)}(?!\d)", section), item


def test_spinexr_lists_read(tmp_path):
    from ecamp.train.downstream.classification import TASKS, read_list_file
    from ecamp.train.downstream.recipes import recipe

    (tmp_path / "val_list.txt").write_text("train/1f1c5c09.png 1\ntrain/9f4fb4f5.png 0 \n")
    rows = read_list_file(tmp_path / "val_list.txt", TASKS["spinexr"])
    assert [(p, y.tolist()) for p, y in rows] == [("train/1f1c5c09.png", [1.0]), ("train/9f4fb4f5.png", [0.0])]
    assert TASKS["spinexr"].metric == "auroc" and TASKS["spinexr"].multilabel
    assert recipe("cls", "spinexr", 10) == recipe("cls", "chestx-ray14", 10)  # no published row: the fallback


def test_check_paths_reports_file_line_and_count(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "l.txt").write_text("a.png 1\n\nfolder.png 0\ngone.png 1\n")
    with pytest.raises(DataError) as e:
        check_paths({tmp_path / "l.txt": ["a.png", "folder.png", "gone.png"]}, tmp_path)
    msg = str(e.value)
    assert "2 path(s)" in msg and f"{tmp_path / 'l.txt'}:3: folder.png: is not a regular file" in msg
    assert f"{tmp_path / 'l.txt'}:4: gone.png: does not exist" in msg and str(e.value.path) == str(tmp_path / "l.txt")
    (tmp_path / "m.csv").write_text("img_path,mask_path\n" + "".join(f"x{i}.png,a.png\n" for i in range(7)))
    with pytest.raises(DataError, match=r"(?s)7 path\(s\).*m.csv:2: x0.png.*m.csv:6: x4.png.*and 2 more"):
        check_paths({tmp_path / "m.csv": [(f"x{i}.png", "a.png") for i in range(7)]}, tmp_path)


def test_a_missing_test_image_stops_finetune_before_training(tmp_path, tiny_folder):
    data = tmp_path / "data"
    for i in range(4):
        _png(data / f"img{i}.png", np.full((64, 64), 40 * i, np.uint8))
    (data / "train_list.txt").write_text("img0.png 1 0 0 0\nimg1.png 0 1 0 0\n")
    (data / "val_list.txt").write_text("img2.png 0 0 1 0\n")
    (data / "test_list.txt").write_text("img3.png 0 0 0 1\nmissing/img9.png 1 0 0 0\n")
    out_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "ecamp", "train", "finetune", "--dataset", "phantom", "--data-root",
                          str(data), "--output-dir", str(out_dir), "--model", f"local-dir:{tiny_folder}",
                          "--num-workers", "0", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert f"{data / 'test_list.txt'}:2: missing/img9.png: does not exist" in res.stderr
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "best").exists()
    assert not (out_dir / "metrics.json").exists()


@pytest.mark.parametrize("lp_head", ["authors", "full-finetune"])
def test_lp_head_the_authors_probe_or_their_scripts_full_finetune(lp_head, tiny_folder, tmp_path):
    from ecamp.train.downstream.classification import finetune_classification
    from ecamp.train.downstream.recipes import recipe
    from ecamp.train.phantom import write_phantom_classification

    data = write_phantom_classification(tmp_path / "cls", 40, seed=0, size=64)
    r = recipe("cls", "phantom", 100, "linear-probe").replace(steps=2, lr=0.5, batch_size=8, warmup=1)
    name = f"local-dir:{tiny_folder}"
    metrics = finetune_classification("phantom", 100, data, tmp_path / "run", mode="linear-probe", recipe=r,
                                      model_name=name, num_workers=0, progress=False, protocol={"lp_head": lp_head})
    assert metrics["protocol_options"]["lp_head"] == lp_head
    trained = ecamp.load(f"local-dir:{tmp_path / 'run' / 'best'}").state_dict()
    fresh = ecamp.load(name, num_classes=4, fc_norm=True).state_dict()  # the authors' classifier, fc_norm fresh
    moved = {k for k, v in trained.items() if not torch.equal(v, fresh[k])}
    assert {"head.weight", "head.bias"} <= moved
    if lp_head == "authors":  # only head.* trained; fc_norm stays at its fresh init
        assert moved == {"head.weight", "head.bias"}
        assert torch.equal(trained["fc_norm.weight"], torch.ones(48))
    else:  # run_lp.sh as published: everything trains
        assert "blocks.0.attn.qkv.weight" in moved
