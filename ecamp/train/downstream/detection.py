"""Downstream detection (dossier 9.4): the authors' RSNA box lists, their frozen-encoder YOLOv3 detector, loss,
NMS and mean average precision over IoU 0.40-0.75 (torchmetrics).

Model (:class:`DetectionModel`): the ViT encoder is frozen; a trainable ``det_head`` (linear) turns its patch
tokens into a [B, D, g, g] map; a three-scale neck (:class:`DetectionNeck`) makes maps at strides 8, 16 and 32 (1x1
convolution, x2 bilinear up / identity / stride-2 down, each followed by a ResNet bottleneck with expansion 8 for
1 and 10 % of the labels, 4 for 100 %); a YOLOv3 head (:class:`YOLOv3Head`, three CBL stacks joined top-down by
nearest up-sampling and concatenation) predicts 3 anchors x (box, objectness, classes) per cell, with the
standard YOLOv3 anchors of a 416-px input scaled to the model's input size.

Loss (:func:`yolo_loss`, the YOLOv3 loss the authors took from MGCA): per scale, each object is assigned to the
cell of its centre and the best-fitting of that scale's anchors by shape IoU (with that code's +1 pixel
convention, in grid units); x, y: BCE on sigmoid offsets,
w, h: MSE in log space, objectness BCE on the assigned anchors plus 0.5 x BCE on the others (anchors whose shape IoU
with an object exceeds 0.5 are not counted as background), class BCE over the assigned anchors (the authors'
averaged it over every anchor of every cell, ``yolo_class_loss_over="all"``); weights 2.5 (x, y, w, h), 1, 1.

Evaluation: objectness >= 0.5, NMS at IoU 0.5, then ``torchmetrics.detection.MeanAveragePrecision`` over IoU
0.40, 0.45, ..., 0.75; the reported number is its ``map``. Fixed relative to the authors, by default: testing uses
``test_list.csv`` (theirs read ``val_list.csv``, #41) and every test image counts, negatives and images without a
prediction included (theirs skipped both, #42); stored boxes are never modified in place (#43).
``authors_protocol=True`` brings back #41, #42 and the other :class:`~ecamp.train.downstream.protocol.Protocol`
items (raw block tokens, 8-bit resize, class loss over all cells, +1-pixel NMS) for comparison with the paper.

Lists: ``image_path,bbox`` CSVs (``train_list{,_1,_10}.csv``, ``val_list.csv``, ``test_list.csv``) with boxes as
a Python literal ``[[x1, y1, x2, y2], ...]`` in the image's pixel coordinates, ``[[0, 0, 0, 0]]`` for none.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecamp.errors import InvalidArgumentError, MissingDependencyError
from ecamp.models.heads import (  # noqa: F401 - the heads are part of this task's API
    YOLOV3_ANCHORS,
    Bottleneck,
    DetectionModel,
    DetectionNeck,
    YOLOv3Head,
    decode,
    postprocess,
    split_predictions,
)
from ecamp.train.common.lists import list_file_for, list_lines, raise_problems, read_table
from ecamp.train.downstream.protocol import Protocol
from ecamp.train.downstream.recipes import Recipe
from ecamp.train.downstream.task import FinetuneRun, HeadTask, run_finetune
from ecamp.transforms import requantize

__all__ = ["DET_TASKS", "DET_LABELS", "YOLOV3_ANCHORS", "read_box_list", "BoxDataset", "collate_boxes", "Bottleneck",
           "DetectionNeck", "YOLOv3Head", "DetectionModel", "yolo_loss", "decode", "postprocess",
           "mean_average_precision", "DetectionTask", "finetune_detection"]

DET_TASKS = ("rsna", "phantom-det")
DET_LABELS = {"rsna": ("pneumonia",), "phantom-det": ("finding",)}  # the box class names of each task
MAP_IOU_THRESHOLDS = tuple(round(0.40 + 0.05 * k, 2) for k in range(8))


_MAX_COORD = 100_000.0  # pixels: no film is larger; a box beyond it is a typo or a unit mistake

def read_box_list(csv_path: str | Path) -> list[tuple[str, np.ndarray]]:
    """``image_path,bbox`` rows -> (path, float32 [N, 4] boxes x1, y1, x2, y2 in pixels; [0, 4] for none)."""
    path = Path(csv_path)
    table = read_table(path, ["image_path", "bbox"], missing_hint="the authors' RSNA detection lists are CSV files "
                                                                  "with image_path,bbox columns")
    rows, problems = [], []
    for k, row in zip(list_lines(path), table, strict=True):
        try:
            boxes = np.array(ast.literal_eval(row["bbox"]), dtype=np.float32)  # literals only: never eval
        except (ValueError, SyntaxError, TypeError):
            boxes = None
        boxes = boxes.reshape(-1, 4) if boxes is not None and boxes.size % 4 == 0 and boxes.ndim <= 2 else None
        if boxes is None:
            problems.append(f"{path}:{k}: bbox is not a list of [x1, y1, x2, y2]: {row['bbox'][:60]!r}")
            continue
        bad = ~np.isfinite(boxes).all(1) | (boxes < 0).any(1) | (boxes > _MAX_COORD).any(1) | \
            (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            problems.append(f"{path}:{k}: box {boxes[bad][0].tolist()} is not x1 <= x2, y1 <= y2 in pixels "
                            f"(0..{_MAX_COORD:g}): {row['bbox'][:60]!r}")
            continue
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]  # [[0,0,0,0]]: no box
        rows.append((row["image_path"], boxes))
    raise_problems(problems, f"List file {path} has {len(problems)} bad line(s)", path)
    return rows


class BoxDataset(torch.utils.data.Dataset):
    """(image [3, S, S], boxes [N, 4] normalised to 0..1) pairs; images and boxes resized to S together by the
    library's :class:`~ecamp.transforms.JointTransform`, no augmentation (as the authors). ``resize``:
    ``"antialias-float"`` or the authors' ``"linear-uint8"`` (cv2 INTER_LINEAR of the 8-bit image)."""

    def __init__(self, root: Path, rows: list[tuple[str, np.ndarray]], cfg: dict, resize: str = "antialias-float"):
        from ecamp.transforms import JointTransform

        self.root, self.rows = root, rows
        self.size = int(cfg["input_size"][-1])
        self.uint8 = resize == "linear-uint8"
        self.transform = JointTransform(cfg, antialias=not self.uint8)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors

        from ecamp.transforms import read_dense_image

        name, boxes = self.rows[i]
        x = read_dense_image(self.root / name, self.transform.policy, uint8=self.uint8)
        # a new tensor: the rows stay as read (#43)
        target = tv_tensors.BoundingBoxes(torch.from_numpy(boxes.copy()), format="XYXY", canvas_size=x.shape[-2:])
        x, target = self.transform(x, target)
        if self.uint8:  # cv2 writes the resized image back to 8 bits
            x = requantize(x, self.transform.mean, self.transform.std)
        return x, (target.as_subclass(torch.Tensor) / self.size).clamp(0.0, 1.0)


def collate_boxes(batch: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.stack([x for x, _ in batch]), [b for _, b in batch]


def _shape_iou(wh1: torch.Tensor, wh2: torch.Tensor, plus_one: bool = True) -> torch.Tensor:
    """IoU of boxes sharing a corner, from their widths and heights: [N, 2] x [A, 2] -> [N, A]. ``plus_one``: the
    pixel convention of the YOLOv3 code the authors used (every side one longer), applied there in grid units."""
    e = 1.0 if plus_one else 0.0
    inter = (torch.minimum(wh1[:, None], wh2[None]) + e).prod(-1)
    return inter / ((wh1[:, None] + e).prod(-1) + (wh2[None] + e).prod(-1) - inter + 1e-16)


def yolo_loss(outputs: list[torch.Tensor], boxes: list[torch.Tensor], anchors: list, img_size: int,
              num_classes: int = 1, labels: list[torch.Tensor] | None = None, ignore_threshold: float = 0.5,
              lambda_xy: float = 2.5, lambda_wh: float = 2.5, lambda_conf: float = 1.0, lambda_cls: float = 1.0,
              anchor_iou_plus_one: bool = True, class_loss_over: str = "positives") -> torch.Tensor:
    """The YOLOv3 loss summed over scales (module docstring); ``boxes`` per image are normalised x1, y1, x2, y2.
    The box and objectness means run over every anchor of every cell, as in the code the authors used; the class
    BCE is the mean over the assigned anchors (``class_loss_over="positives"``) or, as the authors'
    ``yolo_loss.py:97``, over every anchor of every cell and class with the others' terms zero (``"all"``: the
    positives' sum divided by all cells). Anchor matching uses that code's shape IoU with its +1 pixel convention in
    grid units; ``anchor_iou_plus_one=False`` gives the plain IoU."""
    if class_loss_over not in ("positives", "all"):
        raise InvalidArgumentError(f"class_loss_over must be positives or all, got {class_loss_over!r}.")
    total = outputs[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(outputs[0].device.type, enabled=False):
        for raw, scale_anchors in zip(outputs, anchors, strict=True):
            p = split_predictions(raw, num_classes)
            bsz, n_a, h, w, _ = p.shape
            stride_w, stride_h = img_size / w, img_size / h
            a_wh = torch.tensor(scale_anchors, dtype=torch.float32, device=p.device) / torch.tensor(
                [stride_w, stride_h], device=p.device)
            mask = torch.zeros(bsz, n_a, h, w, device=p.device)
            noobj = torch.ones_like(mask)
            tx, ty, tw, th = (torch.zeros_like(mask) for _ in range(4))
            tcls = torch.zeros(bsz, n_a, h, w, num_classes, device=p.device)
            for b, bx in enumerate(boxes):
                if len(bx) == 0:
                    continue
                bx = bx.to(p.device, torch.float32)
                gx, gy = (bx[:, 0] + bx[:, 2]) / 2 * w, (bx[:, 1] + bx[:, 3]) / 2 * h
                gw, gh = (bx[:, 2] - bx[:, 0]) * w, (bx[:, 3] - bx[:, 1]) * h
                gi, gj = gx.long().clamp(0, w - 1), gy.long().clamp(0, h - 1)
                ious = _shape_iou(torch.stack([gw, gh], 1), a_wh, anchor_iou_plus_one)  # [N, A]
                obj, anchor = (ious > ignore_threshold).nonzero(as_tuple=True)  # well-fitting anchors: not background
                noobj[b, anchor, gj[obj], gi[obj]] = 0
                best = ious.argmax(1)
                mask[b, best, gj, gi] = 1
                tx[b, best, gj, gi] = gx - gi
                ty[b, best, gj, gi] = gy - gj
                tw[b, best, gj, gi] = torch.log(gw / a_wh[best, 0] + 1e-16)
                th[b, best, gj, gi] = torch.log(gh / a_wh[best, 1] + 1e-16)
                cls = labels[b].long().to(p.device) if labels is not None else torch.zeros_like(best)
                tcls[b, best, gj, gi, cls] = 1
            x, y = torch.sigmoid(p[..., 0]), torch.sigmoid(p[..., 1])
            conf, pcls = torch.sigmoid(p[..., 4]), torch.sigmoid(p[..., 5:])
            bce, mse = F.binary_cross_entropy, F.mse_loss
            loss = lambda_xy * (bce(x * mask, tx * mask) + bce(y * mask, ty * mask))
            loss = loss + lambda_wh * (mse(p[..., 2] * mask, tw * mask) + mse(p[..., 3] * mask, th * mask))
            loss = loss + lambda_conf * (bce(conf * mask, mask) + 0.5 * bce(conf * noobj, torch.zeros_like(noobj)))
            positive = mask == 1
            if class_loss_over == "all":
                loss = loss + lambda_cls * bce(pcls * mask[..., None], tcls * mask[..., None])
            elif positive.any():
                loss = loss + lambda_cls * bce(pcls[positive], tcls[positive])
            total = total + loss
    return total


def mean_average_precision(preds: list[dict], targets: list[dict], *, authors: bool = False) -> float:
    """torchmetrics mAP over IoU 0.40-0.75 (the reported ``map``). ``authors``: only images with a ground-truth
    box and at least one prediction count, as in the authors' evaluation (#42), and when none does the score is
    torchmetrics' -1 for an empty set, as theirs (``Detection/train.py:284-286``), which their best score of 0
    never takes (D14); otherwise an empty set scores 0."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as e:
        raise MissingDependencyError("Detection metrics need torchmetrics and pycocotools: "
                                     "pip install 'ecamp[train]'.") from e
    if authors:
        pairs = [(p, t) for p, t in zip(preds, targets, strict=True) if len(t["boxes"]) and len(p["boxes"])]
        preds, targets = [p for p, _ in pairs], [t for _, t in pairs]
    if not preds:
        return -1.0 if authors else 0.0
    metric = MeanAveragePrecision(box_format="xyxy", iou_thresholds=list(MAP_IOU_THRESHOLDS))
    metric.update(preds, targets)
    return max(0.0, float(metric.compute()["map"]))  # torchmetrics gives -1 when no image has a box


class DetectionTask(HeadTask):
    """The detector on a frozen encoder (:func:`finetune_detection`)."""

    head, metric = "det", "map"
    collate_fn = staticmethod(collate_boxes)

    def __init__(self, task: str, fraction: int, widths: tuple[int, int, int] = (512, 1024, 2048),
                 head_width: int = 512, conf_threshold: float = 0.5, iou_threshold: float = 0.5):
        key = task.lower()
        if key not in DET_TASKS:
            raise InvalidArgumentError(f"Unknown detection task {task!r}; known: {list(DET_TASKS)}.")
        super().__init__(key, fraction)
        self.widths, self.head_width = widths, head_width
        self.conf_threshold, self.iou_threshold = conf_threshold, iou_threshold

    def default_recipe(self) -> Recipe:
        from ecamp.train.downstream.recipes import recipe

        return recipe("det", self.key, self.fraction)

    def list_files(self, lists: Path, protocol: Protocol) -> dict[str, Path]:
        files = {s: lists / list_file_for(s, self.fraction, suffix=".csv") for s in ("train", "val")}
        files["test"] = lists / list_file_for(protocol.det_test_split, suffix=".csv")  # the authors': val_list (#41)
        return files

    def read_list(self, path: Path) -> list[tuple[str, np.ndarray]]:
        return read_box_list(path)

    def build_model(self, run: FinetuneRun) -> nn.Module:
        import ecamp

        proto = run.protocol
        self.expansion = run.recipe.expansion or (4 if self.fraction == 100 else 8)
        self.encoder = encoder = ecamp.load(run.model_name)
        self.model = DetectionModel(encoder, 1, self.expansion, self.widths, self.head_width,
                                    dense_tokens=proto.dense_tokens, conf_threshold=self.conf_threshold,
                                    iou_threshold=self.iou_threshold, nms_iou_plus_one=proto.nms_iou_plus_one)
        self.class_loss_over, self.skip_empty = proto.yolo_class_loss_over, proto.map_skip_empty
        return self.model

    def datasets(self, run: FinetuneRun) -> dict[str, torch.utils.data.Dataset]:
        from ecamp.factory import resolve_model_cfg

        cfg = resolve_model_cfg(self.encoder)  # the encoder's size, normalisation and image policy
        return {s: BoxDataset(run.data_root, run.rows[s], cfg, resize=run.protocol.resize) for s in run.rows}

    def describe(self, model: nn.Module, run: FinetuneRun) -> None:
        from ecamp.train.downstream.loop import finetuned_block

        model.label_names = list(DET_LABELS[self.key])
        finetune = {"dataset": self.key, "fraction": self.fraction}
        model.ecamp_cfg = finetuned_block(self.encoder, run.model_name, finetune, task="detection",
                                          dense_input={"resize": run.protocol.resize, "rgb": False})

    def train_loss(self, net: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, boxes = batch
        return yolo_loss(net(x.to(device)), boxes, self.model.anchors, self.model.img_size,
                         class_loss_over=self.class_loss_over)

    def predict(self, net: nn.Module, batch: Any, device: torch.device) -> list:
        x, boxes = batch
        size = self.model.img_size
        dets = net.detect(x.to(device))
        truth = [{"boxes": b * size, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
        return [({k: v.cpu() for k, v in d.items()}, t) for d, t in zip(dets, truth, strict=True)]

    def score(self, outputs: list) -> float:
        return mean_average_precision([p for p, _ in outputs], [t for _, t in outputs], authors=self.skip_empty)

    def export(self, model: nn.Module, folder: Path, info: dict[str, Any]) -> None:
        from ecamp.train.downstream.loop import export_dense

        export_dense(model, folder, info)

    def protocol_note(self, run: FinetuneRun) -> str:
        note = (f"tested on {run.files['test'].name}, "
                + ("images without boxes or predictions skipped" if self.skip_empty else "every image counts"))
        return f"{'authors' if run.authors_protocol else 'fixed'}: {note}"

    def metrics_fields(self, run: FinetuneRun) -> dict[str, Any]:
        return {"expansion": self.expansion}


def finetune_detection(task: str, fraction: int, data_root: str | Path, output_dir: str | Path, *,
                       model_name: str = "cxr-vit-b", lists: str | Path | None = None, recipe: Recipe | None = None,
                       authors_protocol: bool = False, widths: tuple[int, int, int] = (512, 1024, 2048),
                       head_width: int = 512, conf_threshold: float = 0.5, iou_threshold: float = 0.5,
                       num_workers: int = 4, device: str | None = None, seed: int = 42,
                       deterministic: bool = False,
                       progress: bool = True, protocol: Protocol | dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the detector on a frozen encoder; ``metrics.json`` gets validation and test mAP (``test_map``).
    ``recipe`` defaults to the authors' row (AdamW 5e-4, weight decay 0.05, early stopping after 20 evaluations,
    neck expansion 8 or 4). ``protocol``: a :class:`Protocol`, or option overrides on top of ecamp's (or, with
    ``authors_protocol``, the authors'). The best model is written to ``output_dir/best``
    (:func:`ecamp.save_pretrained`, thresholds included), which ``ecamp.load`` and ``ecamp predict``
    read."""
    return run_finetune(DetectionTask(task, fraction, widths, head_width, conf_threshold, iou_threshold), data_root,
                        output_dir, model_name=model_name, lists=lists, recipe=recipe,
                        authors_protocol=authors_protocol, num_workers=num_workers, device=device, seed=seed,
                        progress=progress, deterministic=deterministic, protocol=protocol)
