"""Downstream segmentation (dossier 9.3): the authors' SIIM, RSNA and RIGA files, their frozen-encoder model,
loss and per-image Dice.

Model: the encoder is frozen; its patch tokens pass a trainable linear ``seg_head`` and a decoder of four
(conv 3x3, BatchNorm, ReLU, bilinear x2) stages to one logit map per output (two for RIGA: disc and cup). Loss:
``10 * focal(gamma 2) - log(soft Dice)``. Metric: Dice per image at 0.5, an image with an empty mask scoring 1 when
the prediction is empty too, averaged over all images.

Fixed relative to the authors: image and mask are augmented together (their SIIM masks were not, #44; the
``--upstream-protocol`` switch augments the SIIM image alone again, for comparison), and masks are resized with
nearest neighbour (their INTER_AREA made fractional labels, #46).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EcampError
from ..fileio import write_csv
from ..finetune import FrozenEncoder, multiscale_features
from .data import DataError
from .recipes import Recipe

__all__ = ["rle_decode", "read_siim", "read_rsna_boxes", "read_mask_list", "SegmentationModel",
           "PyramidSegmentationModel", "mixed_loss", "dice_per_image", "finetune_segmentation", "convert_lists",
           "SEG_TASKS"]

# task -> (number of outputs, list-file suffix)
SEG_TASKS = {"siim": 1, "rsna": 1, "riga": 2, "phantom-seg": 1}


def rle_decode(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """SIIM-ACR run-length encoding: (offset, length) pairs, each offset relative to the end of the previous run,
    counted down the columns; ``"-1"`` is an empty mask. Returns uint8 0/1 [height, width]."""
    flat = np.zeros(height * width, dtype=np.uint8)
    values = rle.split()
    if values == ["-1"] or not values:
        return flat.reshape(width, height).T
    try:
        nums = np.array([int(v) for v in values])
    except ValueError as e:
        raise DataError(f"Malformed RLE string {rle[:60]!r}.") from e
    if len(nums) % 2:
        raise DataError(f"RLE string has an odd number of values: {rle[:60]!r}.")
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2], strict=True):
        pos += int(start)
        flat[pos:pos + int(length)] = 1
        pos += int(length)
    return flat.reshape(width, height).T


def read_siim(csv_path: str | Path) -> dict[str, list[str]]:
    """``ImageId, EncodedPixels`` rows (several per image) -> {ImageId: [rle, ...]}."""
    out: dict[str, list[str]] = defaultdict(list)
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        cols = [c.strip() for c in reader.fieldnames or []]
        if "ImageId" not in cols or "EncodedPixels" not in cols:
            raise DataError(f"{csv_path} lacks ImageId/EncodedPixels columns; it has {reader.fieldnames}.")
        for row in reader:
            row = {k.strip(): v for k, v in row.items()}
            out[row["ImageId"].strip()].append(row["EncodedPixels"].strip())
    return dict(out)


def read_rsna_boxes(csv_path: str | Path, size: int = 1024) -> list[tuple[str, np.ndarray]]:
    """``image_path, bbox`` rows (the detection lists, :func:`ecamp.train.detection.read_box_list`) -> (path, uint8
    0/1 mask of ``size`` x ``size`` with the boxes filled), the authors' RSNA segmentation targets."""
    from .detection import read_box_list

    rows = []
    for name, boxes in read_box_list(csv_path):
        mask = np.zeros((size, size), np.uint8)
        for x1, y1, x2, y2 in boxes:
            mask[int(y1):int(y2), int(x1):int(x2)] = 1
        rows.append((name, mask))
    return rows


def read_mask_list(csv_path: str | Path) -> list[tuple[str, str]]:
    """RIGA-style (and phantom) lists: ``img_path, mask_path``."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"List file {path} does not exist.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"img_path", "mask_path"} <= set(reader.fieldnames or []):
            raise DataError(f"{path} lacks img_path/mask_path columns; it has {reader.fieldnames}.")
        rows = [(r["img_path"], r["mask_path"]) for r in reader]
    if not rows:
        raise DataError(f"List file {path} is empty.")
    return rows


def _riga_targets(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)
    if m.max() > 1:
        m = m / 255.0
    return np.stack([(m != 0), (m == 1)]).astype(np.float32)  # disc, cup (as the authors)


class MaskDataset(torch.utils.data.Dataset):
    """(image, target [K, S, S]) pairs; training applies one random affine to image and mask together."""

    def __init__(self, root: Path, rows: list[tuple[str, str]], cfg: dict, outputs: int, train: bool,
                 augment_mask: bool = True):
        from torchvision.transforms import v2 as T

        self.root, self.rows, self.outputs, self.train = root, rows, outputs, train
        self.augment_mask = augment_mask  # False: the authors' SIIM pipeline (image augmented alone, #44)
        size = int(cfg["input_size"][-1])
        self.policy = (cfg.get("ecamp") or {}).get("image_policy", "bits")
        self.mean, self.std = float(cfg["mean"][0]), float(cfg["std"][0])
        self.resize = T.Resize((size, size), antialias=True)
        self.affine = T.RandomAffine(degrees=10, scale=(0.9, 1.1))  # parameters drawn at each call
        self.joint = T.Compose([self.affine, self.resize])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import tv_tensors

        from ..io import read_image

        img_path, mask_path = self.rows[i]
        img = read_image(self.root / img_path, policy=self.policy)
        if img.ndim == 3:
            img = img.mean(-1)
        mask = np.asarray(Image.open(self.root / mask_path))
        target = _riga_targets(mask) if self.outputs == 2 else (mask > 0).astype(np.float32)[None]
        x = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(img))[None])
        y = tv_tensors.Mask(torch.from_numpy(target))
        if self.train and self.augment_mask:
            x, y = self.joint(x, y)  # the mask moves with the image
        elif self.train:
            x, y = self.resize(self.affine(x)), self.resize(y)
        else:
            x, y = self.resize(x, y)
        x = ((x.as_subclass(torch.Tensor).expand(3, -1, -1) - self.mean) / self.std).float()
        return x, (y.as_subclass(torch.Tensor) > 0.5).float()


class SegmentationModel(FrozenEncoder):
    """Frozen ViT encoder + trainable token projection + ``outputs`` conv decoders (the authors' SegViT)."""

    def __init__(self, encoder: nn.Module, outputs: int = 1, channels: tuple[int, ...] = (512, 256, 128, 64)):
        super().__init__(encoder)
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

    def __init__(self, encoder: nn.Module, outputs: int = 1, channels: int = 128):
        super().__init__(encoder)
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


def mixed_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 10.0, gamma: float = 2.0) -> torch.Tensor:
    """The authors' ``10 * focal - log(soft Dice)``; soft Dice is global over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    focal = ((1 - p_t) ** gamma * bce).mean()
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return alpha * focal - torch.log(dice)


def dice_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice at 0.5 per image and output; an empty mask scores 1 if the prediction is empty, else 0."""
    pred = (torch.sigmoid(logits) > 0.5).float()
    inter = (pred * target).flatten(2).sum(-1)
    total = pred.flatten(2).sum(-1) + target.flatten(2).sum(-1)
    return torch.where(total == 0, torch.ones_like(total), 2 * inter / total.clamp_min(1e-9))


def finetune_segmentation(task: str, fraction: int, data_root: str | Path, output_dir: str | Path, *,
                          model_name: str = "cxr-vit-b", lists: str | Path | None = None, recipe: Recipe | None = None,
                          upstream_protocol: bool = False, decoder: str = "authors",
                          decoder_channels: tuple[int, ...] = (512, 256, 128, 64), num_workers: int = 4,
                          device: str | None = None, seed: int = 42, progress: bool = True) -> dict[str, Any]:
    """Train the segmentation head on a frozen encoder; ``metrics.json`` gets validation and test Dice.

    Reads RIGA-style lists (``img_path,mask_path``; ``{train_list,train_list_1,train_list_10,val_list,
    test_list}.csv``) for ``riga`` and ``phantom-seg``. SIIM and RSNA ship in other formats (:func:`read_siim`,
    :func:`read_rsna_boxes`); convert them to mask images and such lists first (:func:`convert_lists`).
    ``recipe`` defaults to the authors' row (AdamW, weight decay 0.05, early stopping after 40 evaluations).
    ``decoder="pyramid"`` swaps the authors' decoder for :class:`PyramidSegmentationModel`'s.
    """
    import ecamp

    from ..factory import resolve_model_cfg
    from .downstream import list_file_for
    from .finetune_loop import evaluate, setup_runtime, train_head, write_metrics
    from .recipes import recipe as authors_recipe

    key = task.lower()
    if key not in SEG_TASKS:
        raise EcampError(f"Unknown segmentation task {task!r}; known: {sorted(SEG_TASKS)}.")
    lists = Path(lists or data_root)
    if key in ("siim", "rsna"):
        val_list = lists / list_file_for("val", suffix=".csv")
        if not val_list.is_file() or "mask_path" not in val_list.read_text(encoding="utf-8").split("\n", 1)[0]:
            raise EcampError(f"{task}: convert the authors' {key.upper()} list CSVs once with "
                             f"ecamp.train.segmentation.convert_lists({key!r}, LISTS_DIR, OUT_DIR) and pass "
                             f"--lists OUT_DIR.")
    outputs = SEG_TASKS[key]
    r = recipe or authors_recipe("seg", key, fraction)
    rt = setup_runtime(device, seed)
    rows = {s: read_mask_list(lists / list_file_for(s, fraction, suffix=".csv")) for s in ("train", "val", "test")}
    encoder = ecamp.load(model_name)
    cfg = resolve_model_cfg(encoder)  # the encoder's size, normalisation and image policy
    if decoder == "authors":
        model: nn.Module = SegmentationModel(encoder, outputs, decoder_channels)
    elif decoder == "pyramid":
        model = PyramidSegmentationModel(encoder, outputs)
    else:
        raise EcampError(f"--seg-decoder must be authors or pyramid, got {decoder!r}.")
    augment_mask = not (upstream_protocol and key == "siim")
    sets = {s: MaskDataset(Path(data_root), rows[s], cfg, outputs, train=s == "train", augment_mask=augment_mask)
            for s in rows}

    def train_loss(net, batch, dev):
        x, y = batch
        return mixed_loss(net(x.to(dev)).float(), y.to(dev))

    def predict(net, batch):
        x, y = batch
        return list(dice_per_image(net(x.to(rt.device)).float(), y.to(rt.device)).mean(1).cpu())

    def run_eval(split):
        return evaluate(model, sets[split], predict, lambda d: float(torch.stack(d).mean()), rt,
                        batch_size=r.eval_batch_size, num_workers=num_workers)

    summary = train_head(model, sets["train"], train_loss, lambda: run_eval("val"), r, rt, output_dir,
                         metric="dice", num_workers=num_workers, seed=seed, progress=progress,
                         desc=f"seg {key} {fraction}%")
    metrics = {"task": key, "fraction": fraction, "model": model_name, "decoder": decoder, "steps": r.steps,
               "protocol": "upstream" if upstream_protocol else "fixed", **summary, "test_dice": run_eval("test")}
    write_metrics(rt, output_dir, metrics)
    return metrics


def convert_lists(task: str, lists_dir: str | Path, out_dir: str | Path, *,
                  image_pattern: str = "train/images/1024/dicom/{}.png", size: int = 1024) -> dict[str, int]:
    """Turn the authors' SIIM (``ImageId, EncodedPixels``) or RSNA (``image_path, bbox``) list CSVs into mask PNGs
    under ``out_dir/masks`` and ``img_path,mask_path`` lists in ``out_dir`` with the same file names, which
    ``finetune_segmentation`` reads (pass ``--lists out_dir``). SIIM masks are the union of an image's RLE rows;
    RSNA masks are its filled boxes. ``image_pattern`` places SIIM images (the authors' layout by default)."""
    from PIL import Image

    key = task.lower()
    if key not in ("siim", "rsna"):
        raise EcampError(f"convert_lists handles siim and rsna, not {task!r}.")
    src, out = Path(lists_dir), Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    counts = {}
    files = sorted(p for p in src.glob("*.csv") if p.stem.startswith(("train_list", "val_list", "test_list")))
    if not files:
        raise DataError(f"{src} holds no train_list*/val_list/test_list CSV files.")
    for path in files:
        rows = []
        if key == "siim":
            for image_id, rles in read_siim(path).items():
                mask = np.zeros((size, size), np.uint8)
                for rle in rles:
                    mask |= rle_decode(rle, size, size)
                name = f"masks/{image_id}.png"
                Image.fromarray(mask * 255).save(out / name)
                rows.append((image_pattern.format(image_id), name))
        else:
            for image_path, mask in read_rsna_boxes(path, size=size):
                name = f"masks/{Path(image_path).stem}.png"
                Image.fromarray(mask * 255).save(out / name)
                rows.append((image_path, name))
        write_csv(out / path.name, ["img_path", "mask_path"], rows)
        counts[path.name] = len(rows)
    return counts
