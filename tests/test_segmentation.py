"""Downstream segmentation: the authors' file formats, the frozen-encoder head, loss, Dice, phantom training."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ecamp
from ecamp.train.downstream.segmentation import (
    SegmentationModel,
    dice_per_image,
    mixed_loss,
    read_mask_list,
    read_rsna_boxes,
    read_siim,
    rle_decode,
)
from ecamp.train.phantom import write_phantom_segmentation
from ecamp.train.pretrain.data import DataError


def test_siim_rle_and_csv(tmp_path):
    # a 4x4 mask, runs down the columns: pixels 1-2 (column 0, rows 1-2) and 9 (column 2, row 1)
    m = rle_decode("1 2 6 1", height=4, width=4)
    expected = np.zeros((4, 4), np.uint8)
    expected[1:3, 0] = 1
    expected[1, 2] = 1
    assert np.array_equal(m, expected)
    assert rle_decode("-1", 4, 4).sum() == 0
    with pytest.raises(DataError, match="odd number"):
        rle_decode("1 2 3", 4, 4)
    (tmp_path / "siim.csv").write_text("ImageId, EncodedPixels\nA, -1\nB, 1 2 6 1\nB, 0 1\n")
    assert read_siim(tmp_path / "siim.csv") == {"A": ["-1"], "B": ["1 2 6 1", "0 1"]}


def test_rsna_boxes_and_mask_lists(tmp_path):
    (tmp_path / "rsna.csv").write_text('image_path,bbox\na.png,"[[10, 20, 30, 60]]"\nb.png,"[[0, 0, 0, 0]]"\n'
                                       'c.png,__import__("os")\n')
    with pytest.raises(DataError, match="bbox is not a list"):
        read_rsna_boxes(tmp_path / "rsna.csv", size=64)
    (tmp_path / "rsna.csv").write_text('image_path,bbox\na.png,"[[10, 20, 30, 60]]"\nb.png,"[[0, 0, 0, 0]]"\n')
    rows = read_rsna_boxes(tmp_path / "rsna.csv", size=64)
    assert rows[0][1].sum() == 20 * 40 and rows[0][1][20, 10] == 1 and rows[1][1].sum() == 0
    with pytest.raises(DataError, match=r"lacks column\(s\) \[.img_path., .mask_path.\]"):
        (tmp_path / "l.csv").write_text("image,mask\nx,y\n")
        read_mask_list(tmp_path / "l.csv")


def test_loss_and_dice():
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2:6, 2:6] = 1
    perfect = (target * 20 - 10)
    assert dice_per_image(perfect, target).flatten().tolist() == [1.0, 1.0]  # empty vs empty scores 1
    assert dice_per_image(torch.full_like(target, -10), target).flatten().tolist() == [0.0, 1.0]
    assert mixed_loss(perfect, target) < mixed_loss(-perfect, target)


@pytest.mark.parametrize("decoder", ["authors", "pyramid"])
def test_phantom_segmentation_beats_an_empty_prediction(tiny_folder, tmp_path, decoder):
    root = write_phantom_segmentation(tmp_path / "seg", 120, seed=2, size=64, finding="effusion", variation=0.0)
    out = subprocess.run([sys.executable, "-m", "ecamp.train", "finetune", "--dataset", "phantom-seg", "--head", "seg",
                          "--fraction", "100", "--data-root", str(root), "--output-dir", str(tmp_path / "run"),
                          "--model", f"local-dir:{tiny_folder}", "--max-steps", "80", "--lr", "3e-3",
                          "--batch-size", "16", "--warmup", "5", "--seg-decoder", decoder, "--num-workers", "0",
                          "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # every phantom shows an effusion, so an empty prediction scores 0
    assert metrics["test_dice"] > 0.5 and metrics["decoder"] == decoder, metrics


def test_encoder_stays_frozen(tiny_folder):
    model = SegmentationModel(ecamp.load(f"local-dir:{tiny_folder}"), outputs=2, channels=(16, 8))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    assert not model.encoder.training
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(2, 3, 64, 64), (torch.rand(2, 2, 64, 64) > 0.5).float()
    for _ in range(3):
        loss = mixed_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x).shape == (2, 2, 64, 64)
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())


def test_convert_the_authors_lists(tmp_path):
    from PIL import Image

    from ecamp.train.downstream.segmentation import convert_lists

    src = tmp_path / "siim"
    src.mkdir()
    (src / "train_list.csv").write_text("ImageId, EncodedPixels\nA, -1\nB, 1 2 6 1\nB, 12 1\n")
    (src / "val_list.csv").write_text("ImageId, EncodedPixels\nC, 0 1\n")
    counts = convert_lists("siim", src, tmp_path / "out", size=4)
    assert counts == {"train_list.csv": 2, "val_list.csv": 1}
    rows = read_mask_list(tmp_path / "out" / "train_list.csv")
    assert rows[1] == ("train/images/1024/dicom/B.png", "masks/B.png")
    b = np.asarray(Image.open(tmp_path / "out" / "masks" / "B.png")) > 0
    assert b.sum() == 4 and b[1, 0] and b[2, 0] and b[1, 2] and b[0, 3]  # union of both RLE rows
    rsna = tmp_path / "rsna"
    rsna.mkdir()
    (rsna / "test_list.csv").write_text('image_path,bbox\nimgs/x.png,"[[1, 1, 3, 2]]"\n')
    assert convert_lists("rsna", rsna, tmp_path / "out2", size=4) == {"test_list.csv": 1}
    assert np.asarray(Image.open(tmp_path / "out2" / "masks" / "x.png")).astype(bool).sum() == 2


def test_riga_masks_give_disc_and_cup(tmp_path):
    from PIL import Image

    from ecamp.train.downstream.segmentation import MaskDataset

    # RIGA-style label image: 0 background, 128 disc rim, 255 cup; the authors divide by 255, then disc = != 0
    # and cup = == 1
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 128
    mask[12:20, 12:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.tif")
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "i.png")
    (tmp_path / "l.csv").write_text("img_path,mask_path\ni.png,m.tif\n")
    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    x, y = MaskDataset(tmp_path, read_mask_list(tmp_path / "l.csv"), cfg, outputs=2, train=False)[0]
    assert x.shape == (3, 32, 32) and y.shape == (2, 32, 32)
    assert y[0].sum() == 16 * 16 and y[1].sum() == 8 * 8 and bool((y[1] <= y[0]).all())
