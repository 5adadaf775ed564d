"""Downstream segmentation (dossier 9.3): the authors' SIIM, RSNA and RIGA files, their frozen-encoder model,
loss and per-image Dice.

Model: the encoder is frozen; its patch tokens pass a trainable linear ``seg_head`` and a decoder of four
(conv 3x3, BatchNorm, ReLU, bilinear x2) stages to one logit map per output (two for RIGA: disc and cup). Loss:
``10 * focal(gamma 2) - log(soft Dice)``. Metric: Dice per image at 0.5, an image with an empty mask scoring 1 when
the prediction is empty too, averaged over all images.

Fixed relative to the authors, no switch yet: image and mask are augmented together (their SIIM masks were not,
#44), and masks are resized with nearest neighbour (their INTER_AREA made fractional labels, #46).
"""

from __future__ import annotations

import ast
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EcampError
from ..fileio import atomic_write, write_csv
from .data import DataError

__all__ = ["rle_decode", "read_siim", "read_rsna_boxes", "read_mask_list", "SegmentationModel", "mixed_loss",
           "dice_per_image", "finetune_segmentation", "convert_lists", "SEG_TASKS"]

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
    """``image_path, bbox`` rows, boxes as a literal ``[[x1, y1, x2, y2], ...]`` in 1024-px coordinates
    (``[[0, 0, 0, 0]]`` for none) -> (path, uint8 0/1 mask with the boxes filled)."""
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image_path", "bbox"} <= set(reader.fieldnames or []):
            raise DataError(f"{csv_path} lacks image_path/bbox columns; it has {reader.fieldnames}.")
        for k, row in enumerate(reader, start=2):
            try:
                boxes = ast.literal_eval(row["bbox"])  # literals only: never eval
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{csv_path}:{k}: bbox is not a list literal: {row['bbox'][:60]!r}") from e
            mask = np.zeros((size, size), np.uint8)
            for x1, y1, x2, y2 in boxes:
                mask[int(y1):int(y2), int(x1):int(x2)] = 1
            rows.append((row["image_path"], mask))
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
    """(image, target [K, S, S]) pairs; training applies one random flip/affine to image and mask together."""

    def __init__(self, root: Path, rows: list[tuple[str, str]], cfg: dict, outputs: int, train: bool):
        self.root, self.rows, self.cfg, self.outputs, self.train = root, rows, cfg, outputs, train
        self.size = int(cfg["input_size"][-1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import tv_tensors
        from torchvision.transforms import v2 as T

        from ..io import read_image

        img_path, mask_path = self.rows[i]
        img = read_image(self.root / img_path)
        if img.ndim == 3:
            img = img.mean(-1)
        mask = np.asarray(Image.open(self.root / mask_path))
        target = _riga_targets(mask) if self.outputs == 2 else (mask > 0).astype(np.float32)[None]
        x = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(img))[None])
        y = tv_tensors.Mask(torch.from_numpy(target))
        ops = [T.Resize((self.size, self.size), antialias=True)]
        if self.train:
            ops = [T.RandomAffine(degrees=10, scale=(0.9, 1.1)), *ops]  # joint: the mask moves with the image
        x, y = T.Compose(ops)(x, y)
        mean, std = float(self.cfg["mean"][0]), float(self.cfg["std"][0])
        x = ((x.as_subclass(torch.Tensor).expand(3, -1, -1) - mean) / std).float()
        return x, (y.as_subclass(torch.Tensor) > 0.5).float()


class SegmentationModel(nn.Module):
    """Frozen ViT encoder + trainable token projection + ``outputs`` conv decoders (the authors' SegViT)."""

    def __init__(self, encoder: nn.Module, outputs: int = 1, channels: tuple[int, ...] = (512, 256, 128, 64)):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dim = encoder.num_features
        self.seg_head = nn.Linear(dim, dim)
        self.grid = encoder.patch_embed.grid_size
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

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]
        t = self.seg_head(tokens)
        fmap = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)
        return torch.cat([d(fmap) for d in self.decoders], dim=1)


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
                          model_name: str = "cxr-vit-b", lists: str | Path | None = None, max_steps: int = 3000,
                          lr: float = 5e-4, batch_size: int = 32, warmup: int = 50, eval_every: int | None = None,
                          decoder_channels: tuple[int, ...] = (512, 256, 128, 64), num_workers: int = 4,
                          device: str | None = None, seed: int = 42, progress: bool = True) -> dict[str, Any]:
    """Train the segmentation head on a frozen encoder; ``metrics.json`` gets validation and test Dice.

    Reads RIGA-style lists (``img_path,mask_path``; ``{train_list,train_list_1,train_list_10,val_list,
    test_list}.csv``) for ``riga`` and ``phantom-seg``. SIIM and RSNA ship in other formats (:func:`read_siim`,
    :func:`read_rsna_boxes`); convert them to mask images and such lists first.
    """
    import ecamp

    from .downstream import list_file_for, warmup_cosine

    key = task.lower()
    if key not in SEG_TASKS:
        raise EcampError(f"Unknown segmentation task {task!r}; known: {sorted(SEG_TASKS)}.")
    if key in ("siim", "rsna"):
        converted = Path(lists or data_root)
        if not (converted / list_file_for("val", suffix=".csv")).is_file() or \
                "mask_path" not in (converted / "val_list.csv").read_text(encoding="utf-8").split("\n", 1)[0]:
            raise EcampError(f"{task}: convert the authors' {key.upper()} list CSVs once with "
                             f"ecamp.train.segmentation.convert_lists({key!r}, LISTS_DIR, OUT_DIR) and pass "
                             f"--lists OUT_DIR.")
    outputs = SEG_TASKS[key]
    torch.manual_seed(seed)
    lists = Path(lists or data_root)
    names = {s: list_file_for(s, fraction, suffix=".csv") for s in ("train", "val", "test")}
    rows = {s: read_mask_list(lists / n) for s, n in names.items()}
    encoder = ecamp.load(model_name)
    cfg = dict(encoder.pretrained_cfg)
    model = SegmentationModel(encoder, outputs, decoder_channels)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    root = Path(data_root)
    loaders = {s: torch.utils.data.DataLoader(MaskDataset(root, rows[s], cfg, outputs, train=s == "train"),
                                              batch_size=batch_size if s == "train" else 64, shuffle=s == "train",
                                              num_workers=num_workers,
                                              generator=torch.Generator().manual_seed(seed))
               for s in rows}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.05)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, max_steps))

    @torch.no_grad()
    def evaluate(split: str) -> float:
        model.eval()
        scores = [dice_per_image(model(x.to(dev)), y.to(dev)).cpu() for x, y in loaders[split]]
        return float(torch.cat(scores).mean())

    from tqdm.auto import tqdm

    eval_every = eval_every or max(1, len(loaders["train"]))
    best, best_state, step = -1.0, None, 0
    bar = tqdm(total=max_steps, desc=f"seg {key} {fraction}%", disable=not progress)
    while step < max_steps:
        for x, y in loaders["train"]:
            model.train()
            loss = mixed_loss(model(x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == max_steps:
                val = evaluate("val")
                if val >= best:
                    best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step >= max_steps:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = {"task": key, "fraction": fraction, "model": model_name, "steps": max_steps, "val_dice": best,
               "test_dice": evaluate("test")}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
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
