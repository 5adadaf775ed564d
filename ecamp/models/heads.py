"""Downstream heads on a frozen ECAMP encoder: segmentation (the authors' SegViT decoder and a feature pyramid)
and detection (the authors' ViTDetector: three-scale neck and YOLOv3 head), with YOLO decoding and NMS.

These are what a fine-tuned model needs at inference; their folder format is :mod:`ecamp.folders`, which
``ecamp.load("local-dir:...")`` reads, and the input they were trained on is
:class:`ecamp.transforms.DenseTransform`. Their losses, data and training loop live in the training package
(``downstream``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..finetune import FrozenEncoder, multiscale_features

__all__ = ["SegmentationModel", "PyramidSegmentationModel", "Bottleneck", "DetectionNeck", "YOLOv3Head",
           "DetectionModel", "YOLOV3_ANCHORS", "split_predictions", "decode", "postprocess", "HEAD_KINDS"]

# YOLOv3's anchors (w, h) for a 416-px input, coarsest scale first
YOLOV3_ANCHORS = (((116, 90), (156, 198), (373, 326)), ((30, 61), (62, 45), (59, 119)), ((10, 13), (16, 30), (33, 23)))
DENSE_TOKENS = ("final-norm", "raw-block")


class _DenseHead(FrozenEncoder):
    """A frozen encoder whose patch tokens feed a dense head: after the final LayerNorm (``"final-norm"``) or
    the last block's raw output (``"raw-block"``: the authors' SegViT and ViTDetector delete ``norm``)."""

    def __init__(self, encoder: nn.Module, dense_tokens: str = "final-norm"):
        super().__init__(encoder)
        if dense_tokens not in DENSE_TOKENS:
            raise InvalidArgumentError(f"dense_tokens must be one of {DENSE_TOKENS}, got {dense_tokens!r}.")
        self.dense_tokens = dense_tokens

    @torch.no_grad()
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_tokens == "final-norm":
            return super().patch_tokens(x)
        last = len(self.encoder.blocks) - 1
        return self.encoder.forward_intermediates(x, indices=[last], norm=False, output_fmt="NLC",
                                                  intermediates_only=True)[0]


class SegmentationModel(_DenseHead):
    """Frozen ViT encoder + trainable token projection + ``outputs`` conv decoders (the authors' SegViT);
    ``dense_tokens`` as :class:`_DenseHead`."""

    task, kind = "segmentation", "segvit"

    def __init__(self, encoder: nn.Module, outputs: int = 1, channels: tuple[int, ...] = (512, 256, 128, 64),
                 dense_tokens: str = "final-norm"):
        super().__init__(encoder, dense_tokens)
        self.head_args = {"outputs": outputs, "channels": list(channels), "dense_tokens": dense_tokens}
        dim = encoder.num_features
        self.seg_head = nn.Linear(dim, dim)
        stages = int(round(math.log2(encoder.patch_embed.patch_size[0])))

        def decoder() -> nn.Sequential:
            layers, c_in = [], dim
            for k in range(stages):
                c_out = channels[min(k, len(channels) - 1)]
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                           nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
                c_in = c_out
            layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
            return nn.Sequential(*layers)

        self.decoders = nn.ModuleList([decoder() for _ in range(outputs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.token_map(self.seg_head(self.patch_tokens(x)))
        return torch.cat([d(fmap) for d in self.decoders], dim=1)


class PyramidSegmentationModel(FrozenEncoder):
    """Frozen ViT encoder + a trainable feature-pyramid decoder: four blocks spread over the depth, resampled to
    strides 4, 8, 16 and 32 by :func:`ecamp.finetune.multiscale_features`, projected to ``channels``, merged
    top-down (FPN), then one 3x3 convolution and a bilinear up-sampling to the input size per output. An option of
    ours (``--seg-decoder pyramid``), not the authors' decoder."""

    task, kind = "segmentation", "pyramid"

    def __init__(self, encoder: nn.Module, outputs: int = 1, channels: int = 128):
        super().__init__(encoder)
        self.head_args = {"outputs": outputs, "channels": channels}
        depth = len(encoder.blocks)
        self.indices = [max(0, round(depth * k / 4) - 1) for k in range(1, 5)]
        dim = encoder.num_features
        self.lateral = nn.ModuleList([nn.Conv2d(dim, channels, 1) for _ in range(4)])
        self.smooth = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                    nn.ReLU(inplace=True))
        self.out = nn.Conv2d(channels, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            maps = multiscale_features(self.encoder, x, indices=self.indices)
        merged = None
        for lateral, m in reversed(list(zip(self.lateral, maps, strict=True))):  # coarsest first
            m = lateral(m)
            merged = m if merged is None else m + F.interpolate(merged, size=m.shape[-2:], mode="nearest")
        return F.interpolate(self.out(self.smooth(merged)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 reduce by ``expansion``, 3x3, 1x1 restore, BatchNorm) with an identity shortcut."""

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        mid = max(1, channels // expansion)
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class DetectionNeck(nn.Module):
    """One ViT map at stride 16 -> maps at strides 8, 16 and 32 with ``widths`` channels (the authors' 512, 1024,
    2048)."""

    def __init__(self, dim: int, widths: tuple[int, int, int] = (512, 1024, 2048), expansion: int = 8):
        super().__init__()
        self.widths = widths
        self.fine = nn.Sequential(nn.Conv2d(dim, widths[0], 1),
                                  nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                  Bottleneck(widths[0], expansion))
        self.middle = nn.Sequential(nn.Conv2d(dim, widths[1], 1), Bottleneck(widths[1], expansion))
        self.coarse = nn.Sequential(nn.Conv2d(dim, widths[2], 1, stride=2, bias=False),
                                    Bottleneck(widths[2], expansion))

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fine(fmap), self.middle(fmap), self.coarse(fmap)


def _cbl(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.1))


class _Stack(nn.Module):
    """Five CBLs alternating 1x1 (``narrow``) and 3x3 (``wide``), a sixth 3x3 CBL and the output convolution; the
    fifth CBL's output also feeds the next, finer scale."""

    def __init__(self, c_in: int, narrow: int, wide: int, out: int):
        super().__init__()
        self.trunk = nn.Sequential(_cbl(c_in, narrow, 1), _cbl(narrow, wide, 3), _cbl(wide, narrow, 1),
                                   _cbl(narrow, wide, 3), _cbl(wide, narrow, 1))
        self.out = nn.Sequential(_cbl(narrow, wide, 3), nn.Conv2d(wide, out, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.trunk(x)
        return self.out(branch), branch


class YOLOv3Head(nn.Module):
    """YOLOv3's detection head over three maps (fine, middle, coarse); returns raw predictions coarsest first,
    each [B, anchors * (5 + classes), h, w]. ``width`` is the narrow width of the coarsest stack (YOLOv3: 512)."""

    def __init__(self, in_channels: tuple[int, int, int], num_classes: int = 1, width: int = 512,
                 anchors_per_scale: int = 3):
        super().__init__()
        out = anchors_per_scale * (5 + num_classes)
        fine, middle, coarse = in_channels
        w0, w1, w2 = width, width // 2, width // 4
        self.coarse = _Stack(coarse, w0, 2 * w0, out)
        self.lateral1 = _cbl(w0, w1, 1)
        self.middle = _Stack(middle + w1, w1, 2 * w1, out)
        self.lateral2 = _cbl(w1, w2, 1)
        self.fine = _Stack(fine + w2, w2, 2 * w2, out)

    def forward(self, maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        fine, middle, coarse = maps
        out0, branch = self.coarse(coarse)
        x = F.interpolate(self.lateral1(branch), scale_factor=2, mode="nearest")
        out1, branch = self.middle(torch.cat([x, middle], 1))
        x = F.interpolate(self.lateral2(branch), scale_factor=2, mode="nearest")
        out2, _ = self.fine(torch.cat([x, fine], 1))
        return [out0, out1, out2]


class DetectionModel(_DenseHead):
    """Frozen ViT encoder + trainable ``det_head``, :class:`DetectionNeck` and :class:`YOLOv3Head` (the authors'
    ViTDetector). ``forward`` returns the three raw prediction maps, coarsest first; :meth:`detect` the boxes after
    objectness ``conf_threshold`` and NMS at ``iou_threshold`` (``nms_iou_plus_one``: the authors' NMS, see
    :func:`postprocess`); ``dense_tokens`` as :class:`_DenseHead`."""

    task, kind = "detection", "yolov3"

    def __init__(self, encoder: nn.Module, num_classes: int = 1, expansion: int = 8,
                 widths: tuple[int, int, int] = (512, 1024, 2048), head_width: int = 512,
                 dense_tokens: str = "final-norm", conf_threshold: float = 0.5, iou_threshold: float = 0.5,
                 nms_iou_plus_one: bool = False):
        super().__init__(encoder, dense_tokens)
        self.head_args = {"num_classes": num_classes, "expansion": expansion, "widths": list(widths),
                          "head_width": head_width, "dense_tokens": dense_tokens, "conf_threshold": conf_threshold,
                          "iou_threshold": iou_threshold, "nms_iou_plus_one": nms_iou_plus_one}
        self.conf_threshold, self.iou_threshold, self.nms_iou_plus_one = conf_threshold, iou_threshold, nms_iou_plus_one
        dim = encoder.num_features
        self.grid = tuple(encoder.patch_embed.grid_size)
        if self.grid[0] % 2 or self.grid[1] % 2:
            raise InvalidArgumentError(f"Detection needs an even patch grid for its stride-32 map; this encoder has "
                                       f"{self.grid}.")
        self.img_size = int(encoder.patch_embed.img_size[0])
        self.num_classes = num_classes
        self.anchors = [[(w * self.img_size / 416, h * self.img_size / 416) for w, h in scale]
                        for scale in YOLOV3_ANCHORS]
        self.det_head = nn.Linear(dim, dim)
        self.neck = DetectionNeck(dim, widths, expansion)
        self.head = YOLOv3Head(widths, num_classes, head_width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.neck(self.token_map(self.det_head(self.patch_tokens(x)))))

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict]:
        """Per image {"boxes" [N, 4] x1, y1, x2, y2 in input pixels, "scores", "labels"}."""
        return postprocess(decode(self(x), self.anchors, self.img_size, self.num_classes), self.conf_threshold,
                           self.iou_threshold, iou_plus_one=self.nms_iou_plus_one)


def split_predictions(raw: torch.Tensor, num_classes: int) -> torch.Tensor:
    b, _, h, w = raw.shape
    return raw.float().view(b, 3, 5 + num_classes, h, w).permute(0, 1, 3, 4, 2)  # [B, A, h, w, 5 + C]


def decode(outputs: list[torch.Tensor], anchors: list, img_size: int, num_classes: int = 1) -> torch.Tensor:
    """Raw maps -> [B, boxes, 5 + C]: centre x, y, width, height in input pixels, objectness, class scores."""
    rows = []
    for raw, scale_anchors in zip(outputs, anchors, strict=True):
        p = split_predictions(raw, num_classes)
        bsz, n_a, h, w, _ = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
        a = torch.tensor(scale_anchors, dtype=torch.float32, device=p.device).view(1, n_a, 1, 1, 2)
        xy = (torch.sigmoid(p[..., :2]) + torch.stack([gx, gy], -1)) * torch.tensor([img_size / w, img_size / h],
                                                                                      device=p.device)
        wh = torch.exp(p[..., 2:4]) * a
        rows.append(torch.cat([xy, wh, torch.sigmoid(p[..., 4:])], -1).reshape(bsz, -1, 5 + num_classes))
    return torch.cat(rows, 1)


def _pixel_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
               ) -> torch.Tensor:
    """The YOLOv3 NMS the authors used: per class, greedy by score, IoU with every side one pixel longer, boxes
    with IoU >= ``iou_threshold`` suppressed. Returns kept indices, highest score first within each class."""
    keep = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        idx = idx[scores[idx].argsort(descending=True, stable=True)]
        while len(idx):
            top, idx = idx[0], idx[1:]
            keep.append(top)
            if not len(idx):
                break
            a, b = boxes[top], boxes[idx]
            iw = (torch.minimum(a[2], b[:, 2]) - torch.maximum(a[0], b[:, 0]) + 1).clamp_min(0)
            ih = (torch.minimum(a[3], b[:, 3]) - torch.maximum(a[1], b[:, 1]) + 1).clamp_min(0)
            inter = iw * ih
            area = lambda t: (t[..., 2] - t[..., 0] + 1) * (t[..., 3] - t[..., 1] + 1)  # noqa: E731
            idx = idx[inter / (area(a) + area(b) - inter + 1e-16) < iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)


def postprocess(decoded: torch.Tensor, conf_threshold: float = 0.5, iou_threshold: float = 0.5, *,
                iou_plus_one: bool = False) -> list[dict]:
    """Objectness threshold, then NMS per class -> per image {"boxes" x1, y1, x2, y2, "scores", "labels"}.
    ``iou_plus_one``: the authors' NMS (:func:`_pixel_nms`, IoU in input pixels with the +1 convention, ties at
    the threshold suppressed) instead of torchvision's (plain IoU, suppressed above the threshold)."""
    from torchvision.ops import batched_nms, box_convert

    results = []
    for det in decoded:
        keep = det[:, 4] >= conf_threshold
        det = det[keep]
        boxes = box_convert(det[:, :4], "cxcywh", "xyxy")
        scores, labels = det[:, 4], det[:, 5:].argmax(1)
        nms = _pixel_nms if iou_plus_one else batched_nms
        idx = nms(boxes, scores, labels, iou_threshold)
        results.append({"boxes": boxes[idx], "scores": scores[idx], "labels": labels[idx]})
    return results


# -- the head classes by the name a folder's config.json records (``head.kind``; ecamp.folders reads and writes it)
HEAD_KINDS: dict[str, type[nn.Module]] = {"segvit": SegmentationModel, "pyramid": PyramidSegmentationModel,
                                          "yolov3": DetectionModel}
