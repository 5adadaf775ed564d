"""Downstream segmentation (dossier 9.3): the authors' SIIM, RSNA and RIGA files, their frozen-encoder model,
loss and per-image Dice.

Model: the encoder is frozen; its patch tokens pass a trainable linear ``seg_head`` and a decoder of four
(conv 3x3, BatchNorm, ReLU, bilinear x2) stages to one logit map per output (two for RIGA: disc and cup). Loss:
``10 * focal(gamma 2) - log(soft Dice)``. Metric: Dice per image at 0.5, an image with an empty mask scoring 1 when
the prediction is empty too, averaged over all images.

Training augmentation, as the authors': with probability 0.5 one random affine (rotation +-10 degrees, scale
0.9-1.1, black border) at the image's resolution, bilinear for the image, nearest for the mask, then the resize.

Fixed relative to the authors: image and mask are augmented together (their SIIM masks were not, #44), and masks
are resized with nearest neighbour (their INTER_AREA made fractional labels, #46). These and the other differences
(raw or normed tokens, SIIM negative sampling, resize, RIGA colour and loss) are
:class:`~ecamp.train.downstream.protocol.Protocol` options; ``--authors-protocol`` sets all of them to the authors'.
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
from ecamp.train.common.lists import list_file_for, read_table
from ecamp.train.downstream.protocol import Protocol
from ecamp.train.downstream.recipes import Recipe
from ecamp.train.downstream.task import FinetuneRun, HeadTask, run_finetune
from ecamp.transforms import read_dense_image, requantize

__all__ = ["rle_decode", "read_siim", "read_rsna_boxes", "read_mask_list", "SegmentationModel",
           "PyramidSegmentationModel", "mixed_loss", "dice_per_image", "SegmentationTask", "finetune_segmentation",
           "convert_lists", "balance_negatives", "SEG_TASKS", "SEG_LABELS"]  # the models: from ecamp.models.heads

# task -> number of outputs
SEG_TASKS = {"siim": 1, "rsna": 1, "riga": 2, "phantom-seg": 1}
# task -> the name of each output (the label names of the fine-tuned model)
SEG_LABELS = {"siim": ("pneumothorax",), "rsna": ("pneumonia",), "riga": ("optic disc", "optic cup"),
              "phantom-seg": ("finding",)}


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


def _positives(csv_path: Path, root: Path, rows: list[tuple[str, str]]) -> list[bool]:
    """Whether each row's mask has a foreground pixel: the ``positive`` column :func:`convert_lists` writes, or
    the mask file itself."""
    table = read_table(csv_path, ["img_path", "mask_path"])
    if "positive" in table[0]:
        return [r["positive"].strip() in ("1", "True", "true") for r in table]
    from PIL import Image

    return [bool(np.asarray(Image.open(root / mask)).any()) for _, mask in rows]


def balance_negatives(rows: list, positive: list[bool], seed: int) -> list:
    """All positive rows plus as many negatives drawn without replacement (all of them if fewer), in list order:
    the authors' SIIM training set (``my_dataset.py:103-111``; their draw was unseeded, this one is seeded)."""
    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    chosen = np.random.default_rng(seed).choice(len(neg), size=min(len(pos), len(neg)), replace=False)
    return [rows[i] for i in sorted(pos + [neg[j] for j in chosen])]


def _riga_targets(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)
    if m.max() > 1:
        m = m / 255.0
    return np.stack([(m != 0), (m == 1)]).astype(np.float32)  # disc, cup (as the authors)


class MaskDataset(torch.utils.data.Dataset):
    """(image, target [K, S, S]) pairs through the library's :class:`~ecamp.transforms.JointTransform`; training
    draws, with probability ``affine_p``, one random affine for image and mask together.

    ``augment_mask=False``: the authors' SIIM pipeline (image augmented alone, #44). ``interpolation``: of the
    image in the affine (masks: nearest). ``resize="linear-uint8"``: the authors' cv2 resize (8-bit input, bilinear
    without antialiasing, 8-bit output). ``rgb``: colour images, each channel normalised (the authors' RIGA).
    """

    def __init__(self, root: Path, rows: list[tuple[str, str]], cfg: dict, outputs: int, train: bool,
                 augment_mask: bool = True, *, affine_p: float = 0.5, interpolation: str = "bilinear",
                 resize: str = "antialias-float", rgb: bool = False):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2 as T

        from ecamp.transforms import JointTransform

        self.root, self.rows, self.outputs, self.train = root, rows, outputs, train
        self.uint8, self.rgb = resize == "linear-uint8", rgb
        affine = None
        if train and affine_p > 0:  # drawn at each call
            mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.NEAREST
            affine = T.RandomApply([T.RandomAffine(degrees=10, scale=(0.9, 1.1), interpolation=mode)], p=affine_p)
        self.transform = JointTransform(cfg, augment=affine, augment_target=augment_mask, antialias=not self.uint8)

    def _image(self, path: Path) -> torch.Tensor:
        """[1 or 3, H, W] in [0, 1]: grey (the mean of colour channels) or colour, 8-bit levels for uint8."""
        return read_dense_image(path, self.transform.policy, rgb=self.rgb, uint8=self.uint8)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import tv_tensors

        img_path, mask_path = self.rows[i]
        mask = np.asarray(Image.open(self.root / mask_path))
        target = _riga_targets(mask) if self.outputs == 2 else (mask > 0).astype(np.float32)[None]
        x, y = self.transform(self._image(self.root / img_path), tv_tensors.Mask(torch.from_numpy(target)))
        if self.uint8:  # cv2 writes the resized image back to 8 bits
            x = requantize(x, self.transform.mean, self.transform.std)
        return x, (y.as_subclass(torch.Tensor) > 0.5).float()


def mixed_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 10.0, gamma: float = 2.0, *,
               per_output: bool = False) -> torch.Tensor:
    """The authors' ``10 * focal - log(soft Dice)``; soft Dice is global over the batch. ``per_output``: the mean
    of the loss of each output channel (the authors' RIGA ``(Mixed(disc) + Mixed(cup)) / 2``) instead of one soft
    Dice pooled over all channels."""
    if per_output and logits.shape[1] > 1:
        return torch.stack([mixed_loss(logits[:, k:k + 1], target[:, k:k + 1], alpha, gamma)
                            for k in range(logits.shape[1])]).mean()
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


class SegmentationTask(HeadTask):
    """The segmentation head on a frozen encoder (:func:`finetune_segmentation`)."""

    head, metric = "seg", "dice"

    def __init__(self, task: str, fraction: int, decoder: str = "authors",
                 decoder_channels: tuple[int, ...] = (512, 256, 128, 64)):
        key = task.lower()
        if key not in SEG_TASKS:
            raise InvalidArgumentError(f"Unknown segmentation task {task!r}; known: {sorted(SEG_TASKS)}.")
        if decoder not in ("authors", "pyramid"):
            raise InvalidArgumentError(f"--seg-decoder must be authors or pyramid, got {decoder!r}.")
        super().__init__(key, fraction)
        self.task, self.outputs, self.decoder, self.decoder_channels = task, SEG_TASKS[key], decoder, decoder_channels

    def check_lists(self, lists: Path) -> None:
        if self.key in ("siim", "rsna"):
            val_list = lists / list_file_for("val", suffix=".csv")
            if not val_list.is_file() or "mask_path" not in val_list.read_text(encoding="utf-8").split("\n", 1)[0]:
                raise DataError(f"{self.task}: convert the authors' {self.key.upper()} list CSVs once with "
                                f"ecamp.train.downstream.segmentation.convert_lists({self.key!r}, LISTS_DIR, OUT_DIR) "
                                f"and pass --lists OUT_DIR.", path=val_list)

    def default_recipe(self) -> Recipe:
        from ecamp.train.downstream.recipes import recipe

        return recipe("seg", self.key, self.fraction)

    def read_list(self, path: Path) -> list[tuple[str, str]]:
        return read_mask_list(path)

    def list_paths(self, rows: list) -> list:
        return rows  # image and mask

    def prepare_rows(self, run: FinetuneRun) -> dict[str, list]:
        rows = run.rows
        if self.key == "siim" and run.protocol.siim_balance_negatives:
            rows["train"] = balance_negatives(rows["train"], _positives(run.files["train"], run.data_root,
                                                                        rows["train"]), run.seed)
        return rows

    def build_model(self, run: FinetuneRun) -> nn.Module:
        import ecamp
        from ecamp.factory import resolve_model_cfg

        self.encoder = encoder = ecamp.load(run.model_name)
        self.cfg = resolve_model_cfg(encoder)  # the encoder's size, normalisation and image policy
        self.per_output = run.protocol.riga_loss == "mean-of-two"
        if self.decoder == "authors":
            return SegmentationModel(encoder, self.outputs, self.decoder_channels,
                                     dense_tokens=run.protocol.dense_tokens)
        return PyramidSegmentationModel(encoder, self.outputs)

    def datasets(self, run: FinetuneRun) -> dict[str, torch.utils.data.Dataset]:
        proto, key = run.protocol, self.key
        augment_mask = proto.siim_augment_mask or key != "siim"
        return {s: MaskDataset(run.data_root, run.rows[s], self.cfg, self.outputs, train=s == "train",
                               augment_mask=augment_mask, affine_p=proto.affine_p,
                               interpolation=proto.image_interpolation, resize=proto.resize,
                               rgb=proto.riga_rgb and key == "riga") for s in run.rows}

    def describe(self, model: nn.Module, run: FinetuneRun) -> None:
        from ecamp.train.downstream.loop import finetuned_block

        model.label_names = list(SEG_LABELS[self.key])
        finetune = {"dataset": self.key, "fraction": self.fraction}
        model.ecamp_cfg = finetuned_block(self.encoder, run.model_name, finetune, task="segmentation",
                                          dense_input={"resize": run.protocol.resize,
                                                       "rgb": run.protocol.riga_rgb and self.key == "riga"})

    def train_loss(self, net: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, y = batch
        return mixed_loss(net(x.to(device)).float(), y.to(device), per_output=self.per_output)

    def predict(self, net: nn.Module, batch: Any, device: torch.device) -> list:
        x, y = batch
        return list(dice_per_image(net(x.to(device)).float(), y.to(device)).mean(1).cpu())

    def score(self, outputs: list) -> float:
        return float(torch.stack(outputs).mean())

    def export(self, model: nn.Module, folder: Path, info: dict[str, Any]) -> None:
        from ecamp.train.downstream.loop import export_dense

        export_dense(model, folder, info)

    def protocol_note(self, run: FinetuneRun) -> str:
        return "authors" if run.authors_protocol else "fixed"

    def metrics_fields(self, run: FinetuneRun) -> dict[str, Any]:
        return {"decoder": self.decoder, "train_images": len(run.rows["train"])}


def finetune_segmentation(task: str, fraction: int, data_root: str | Path, output_dir: str | Path, *,
                          model_name: str = "cxr-vit-b", lists: str | Path | None = None, recipe: Recipe | None = None,
                          authors_protocol: bool = False, decoder: str = "authors",
                          decoder_channels: tuple[int, ...] = (512, 256, 128, 64), num_workers: int = 4,
                          device: str | None = None, seed: int = 42, progress: bool = True,
                          deterministic: bool = False,
                          protocol: Protocol | dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the segmentation head on a frozen encoder; ``metrics.json`` gets validation and test Dice.

    Reads RIGA-style lists (``img_path,mask_path``; ``{train_list,train_list_1,train_list_10,val_list,
    test_list}.csv``) for ``riga`` and ``phantom-seg``. SIIM and RSNA ship in other formats (:func:`read_siim`,
    :func:`read_rsna_boxes`); convert them to mask images and such lists first (:func:`convert_lists`).
    ``recipe`` defaults to the authors' row (AdamW, weight decay 0.05, early stopping after 40 evaluations).
    ``decoder="pyramid"`` swaps the authors' decoder for :class:`PyramidSegmentationModel`'s. ``protocol``: a
    :class:`Protocol`, or option overrides on top of ecamp's (or, with ``authors_protocol``, the authors').
    The best model is written to ``output_dir/best`` (:func:`ecamp.save_pretrained`, with the input
    settings :class:`~ecamp.transforms.DenseTransform` needs), which ``ecamp.load`` and ``ecamp predict`` read.
    """
    return run_finetune(SegmentationTask(task, fraction, decoder, decoder_channels), data_root, output_dir,
                        model_name=model_name, lists=lists, recipe=recipe, authors_protocol=authors_protocol,
                        num_workers=num_workers, device=device, seed=seed, progress=progress,
                        deterministic=deterministic, protocol=protocol)


def convert_lists(task: str, lists_dir: str | Path, out_dir: str | Path, *,
                  image_pattern: str = "train/images/1024/dicom/{}.png", size: int = 1024) -> dict[str, int]:
    """Turn the authors' SIIM (``ImageId, EncodedPixels``) or RSNA (``image_path, bbox``) list CSVs into mask PNGs
    under ``out_dir/masks`` and ``img_path,mask_path,positive`` lists in ``out_dir`` with the same file names,
    which ``finetune_segmentation`` reads (pass ``--lists out_dir``; ``positive`` serves the SIIM negative
    balancing). SIIM masks are the union of an image's RLE rows;
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
                rows.append((image_pattern.format(image_id), name, int(mask.any())))
        else:
            for image_path, mask in read_rsna_boxes(path, size=size):
                name = f"masks/{Path(image_path).stem}.png"
                Image.fromarray(mask * 255).save(out / name)
                rows.append((image_path, name, int(mask.any())))
        write_csv(out / path.name, ["img_path", "mask_path", "positive"], rows)
        counts[path.name] = len(rows)
    return counts
