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

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecamp.errors import DataError, InvalidArgumentError
from ecamp.fileio import write_csv
from ecamp.models.heads import PyramidSegmentationModel, SegmentationModel
from ecamp.train.common.lists import read_table
from ecamp.train.downstream.recipes import Recipe

__all__ = ["rle_decode", "read_siim", "read_rsna_boxes", "read_mask_list", "SegmentationModel",
           "PyramidSegmentationModel", "mixed_loss", "dice_per_image", "finetune_segmentation", "convert_lists",
           "SEG_TASKS"]  # the models are re-exported from ecamp.models.heads

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
    for row in read_table(csv_path, ["ImageId", "EncodedPixels"], strip=True):
        out[row["ImageId"]].append(row["EncodedPixels"])
    return dict(out)


def read_rsna_boxes(csv_path: str | Path, size: int = 1024) -> list[tuple[str, np.ndarray]]:
    """``image_path, bbox`` rows (the detection lists, read by
    :func:`ecamp.train.downstream.detection.read_box_list`) -> (path, uint8 0/1 mask of ``size`` x ``size``
    with the boxes filled), the authors' RSNA segmentation targets."""
    from ecamp.train.downstream.detection import read_box_list

    rows = []
    for name, boxes in read_box_list(csv_path):
        mask = np.zeros((size, size), np.uint8)
        for x1, y1, x2, y2 in boxes:
            mask[int(y1):int(y2), int(x1):int(x2)] = 1
        rows.append((name, mask))
    return rows


def read_mask_list(csv_path: str | Path) -> list[tuple[str, str]]:
    """RIGA-style (and phantom) lists: ``img_path, mask_path``."""
    return [(r["img_path"], r["mask_path"]) for r in read_table(csv_path, ["img_path", "mask_path"])]


def _riga_targets(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)
    if m.max() > 1:
        m = m / 255.0
    return np.stack([(m != 0), (m == 1)]).astype(np.float32)  # disc, cup (as the authors)


class MaskDataset(torch.utils.data.Dataset):
    """(image, target [K, S, S]) pairs through the library's :class:`~ecamp.transforms.JointTransform`; training
    draws one random affine for image and mask together."""

    def __init__(self, root: Path, rows: list[tuple[str, str]], cfg: dict, outputs: int, train: bool,
                 augment_mask: bool = True):
        from torchvision.transforms import v2 as T

        from ecamp.transforms import JointTransform

        self.root, self.rows, self.outputs, self.train = root, rows, outputs, train
        # augment_mask=False: the authors' SIIM pipeline (image augmented alone, #44)
        affine = T.RandomAffine(degrees=10, scale=(0.9, 1.1)) if train else None  # drawn at each call
        self.transform = JointTransform(cfg, augment=affine, augment_target=augment_mask)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import tv_tensors

        img_path, mask_path = self.rows[i]
        mask = np.asarray(Image.open(self.root / mask_path))
        target = _riga_targets(mask) if self.outputs == 2 else (mask > 0).astype(np.float32)[None]
        x, y = self.transform(self.root / img_path, tv_tensors.Mask(torch.from_numpy(target)))
        return x, (y.as_subclass(torch.Tensor) > 0.5).float()


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
    from ecamp.factory import resolve_model_cfg
    from ecamp.train.downstream.classification import list_file_for
    from ecamp.train.downstream.loop import evaluate, setup_runtime, train_head, write_metrics
    from ecamp.train.downstream.recipes import recipe as authors_recipe

    key = task.lower()
    if key not in SEG_TASKS:
        raise InvalidArgumentError(f"Unknown segmentation task {task!r}; known: {sorted(SEG_TASKS)}.")
    lists = Path(lists or data_root)
    if key in ("siim", "rsna"):
        val_list = lists / list_file_for("val", suffix=".csv")
        if not val_list.is_file() or "mask_path" not in val_list.read_text(encoding="utf-8").split("\n", 1)[0]:
            raise DataError(f"{task}: convert the authors' {key.upper()} list CSVs once with "
                           f"ecamp.train.downstream.segmentation.convert_lists({key!r}, LISTS_DIR, OUT_DIR) and pass "
                           f"--lists OUT_DIR.", path=val_list)
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
        raise InvalidArgumentError(f"--seg-decoder must be authors or pyramid, got {decoder!r}.")
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
        raise InvalidArgumentError(f"convert_lists handles siim and rsna, not {task!r}.")
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
