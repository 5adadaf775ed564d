"""ecamp.explain: rollout and Grad-CAM maps on the original film's pixels, aligned with it; the PNG and the command."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch import nn

import ecamp
from ecamp.cli import main
from ecamp.errors import InvalidArgumentError, MissingDependencyError
from ecamp.explain import explain, save_overlay

from helpers.builders import make_tiny_encoder, write_dicom

# a 200 x 300 film: the transform resizes it to 64 x 96 and keeps x in [50, 250) (input columns 16..80). The
# square covers input rows 16..32 and columns 40..56, i.e. exactly the tokens (2..3, 5..6) of the 8-px grid.
H, W = 200, 300
SQUARE = (slice(50, 100), slice(175, 225))
CROPPED_AWAY = (slice(120, 170), slice(0, 40))  # a second square outside the centre crop


def _film() -> np.ndarray:
    film = np.zeros((H, W), np.uint8)
    film[SQUARE] = 255
    film[CROPPED_AWAY] = 255
    return film


def _probe_vit(kind: str) -> nn.Module:
    """A one-block ViT whose answer is known: tokens carry their patch's brightness (channel 0) and a constant
    (channel 1), no position embedding. ``"rollout"``: every token attends to the bright tokens; ``"gradcam"``:
    class "bright" (0) is the pooled brightness, class "dark" (1) its negative, so the CAM is the bright tokens."""
    import timm

    cfg = ecamp.get_pretrained_cfg("cxr-vit-b")
    block = cfg.pop("ecamp")
    cfg["input_size"] = [3, 64, 64]
    model = timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg=cfg, global_pool="avg",
                              fc_norm=False, num_classes=2 if kind == "gradcam" else 0, embed_dim=48, depth=1,
                              num_heads=3, img_size=64, patch_size=8)
    model.ecamp_cfg = ecamp.config.EcampCfg.from_dict(block)
    dim, head_dim = 48, 16
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # attention output and MLP zero: the block passes its tokens through
        model.patch_embed.proj.weight[0] = 1 / (3 * 8 * 8)
        model.patch_embed.proj.bias[1] = 1.0
        attn = model.blocks[0].attn
        for h in range(3):  # query: the constant; key: the brightness
            attn.qkv.weight[h * head_dim, 1] = 10.0
            attn.qkv.weight[dim + h * head_dim, 0] = 1.0
        if kind == "gradcam":
            model.head.weight[0, 0], model.head.weight[1, 0] = 1.0, -1.0
    model.blocks[0].norm1 = model.blocks[0].norm2 = model.norm = nn.Identity()
    model.pretrained_cfg["label_names"] = ["bright", "dark"]
    return model.eval()


def _centroid(heat: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0:heat.shape[0], 0:heat.shape[1]]
    return float((heat * yy).sum() / heat.sum()), float((heat * xx).sum() / heat.sum())


@pytest.mark.parametrize("kind", ["rollout", "gradcam"])
def test_the_map_lies_on_the_film(kind):
    heat = explain(_probe_vit(kind), _film(), target="bright" if kind == "gradcam" else None)
    assert heat.shape == (H, W) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.99
    cy, cx = _centroid(heat)
    assert abs(cy - 75) < 5 and abs(cx - 200) < 5  # the square's centre
    assert heat[SQUARE].mean() > 0.6
    assert heat[150:200, 60:150].max() < 0.05  # dark film inside the crop
    assert not heat[:, :49].any() and not heat[:, 251:].any()  # cropped away: never seen, so 0


def test_the_map_flips_with_the_film():
    model = _probe_vit("rollout")
    film = _film()
    np.testing.assert_allclose(explain(model, film[:, ::-1].copy()), explain(model, film)[:, ::-1], atol=1e-5)


def test_the_fundus_field_of_view_crop_is_followed_too():
    yy, xx = np.mgrid[0:300, 0:400]
    disc = (yy - 160) ** 2 + (xx - 250) ** 2 < 100 ** 2  # off-centre in its black frame
    film = (disc * 200).astype(np.uint8)
    model = _probe_vit("gradcam")
    heat = explain(model, film, target="bright", transform=ecamp.get_transform(model, fov_crop=True))
    cy, cx = _centroid(heat)
    assert heat.shape == film.shape and abs(cy - 160) < 1 and abs(cx - 250) < 1
    assert heat[(yy - 160) ** 2 + (xx - 250) ** 2 < 80 ** 2].mean() > 0.95 and not heat[:, :140].any()


def test_a_monochrome1_dicom_gives_the_map_of_its_png(tmp_path):
    film = _film()
    stored = (4095 - film.astype(np.uint16) * 16).astype(np.uint16)  # MONOCHROME1: bright is low
    dcm = write_dicom(tmp_path, stored, PhotometricInterpretation="MONOCHROME1", BitsStored=12, HighBit=11)
    png = tmp_path / "film.png"
    Image.fromarray(film).save(png)
    model = _probe_vit("gradcam")
    np.testing.assert_allclose(explain(model, dcm), explain(model, png), atol=1e-4)


def test_grad_cam_explains_the_class_asked_for():
    model = _probe_vit("gradcam")
    bright = explain(model, _film(), target="bright")
    np.testing.assert_array_equal(bright, explain(model, _film(), target=0))
    dark = explain(model, _film(), target="dark")
    assert dark[70:80, 195:205].max() < 0.05 and dark[150:200, 60:150].mean() > 0.9  # the background
    np.testing.assert_array_equal(dark, explain(model, _film()))  # the top class: the film is mostly dark
    with pytest.raises(InvalidArgumentError, match=r"\['bright', 'dark'\]"):
        explain(model, _film(), target="nodule")
    with pytest.raises(InvalidArgumentError, match="out of range"):
        explain(model, _film(), target=2)


def test_real_non_square_dicom_keeps_its_grid_and_the_model_is_left_as_it_was():
    path = get_testdata_file("RG1_UNCR.dcm")  # 1955 x 1841, MONOCHROME1, 15 bits
    shape = ecamp.io.read_image(path).shape
    encoder = make_tiny_encoder()
    fused = [blk.attn.fused_attn for blk in encoder.blocks]
    x = torch.randn(1, 3, 64, 64)
    before = encoder(x)
    encoder.train()
    heat = explain(encoder, path)
    assert heat.shape == shape == (1955, 1841) and 0 <= heat.min() and heat.max() <= 1
    assert not heat[:50].any() and heat[60:-60].max() == pytest.approx(1, abs=1e-3)  # top and bottom cropped
    assert encoder.training and [blk.attn.fused_attn for blk in encoder.blocks] == fused
    assert not any(m._forward_hooks for m in encoder.modules())
    encoder.eval()
    assert torch.equal(encoder(x), before)
    classifier = make_tiny_encoder()
    classifier.reset_classifier(3)
    assert explain(classifier, path, target=1).shape == shape


def test_wrong_uses_are_refused():
    encoder, film = make_tiny_encoder(), _film()
    with pytest.raises(InvalidArgumentError, match="rollout"):
        explain(encoder, film, method="gradcam")
    with pytest.raises(InvalidArgumentError, match="not class-specific"):
        explain(encoder, film, target=0)
    with pytest.raises(InvalidArgumentError, match="Unknown explain method"):
        explain(encoder, film, method="occlusion")
    with pytest.raises(InvalidArgumentError, match="eval-mode"):
        explain(encoder, film, transform=ecamp.get_transform(encoder, train=True))
    with pytest.raises(InvalidArgumentError, match=r"\.png"):
        save_overlay(encoder, film, "map.jpg")


def test_without_the_plot_extra_the_error_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r'ecamp\[plot\]'):
        save_overlay(make_tiny_encoder(), _film(), tmp_path / "map.png")
    assert not list(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(MissingDependencyError, match=r'ecamp\[plot\]'):
        explain(_probe_vit("gradcam"), _film())


def test_the_command_writes_a_png(tmp_path, capsys):
    encoder_dir, classifier_dir = tmp_path / "encoder", tmp_path / "classifier"
    ecamp.save_pretrained(make_tiny_encoder(), encoder_dir, name="tiny-cxr")
    classifier = make_tiny_encoder()
    classifier.reset_classifier(2)
    ecamp.save_pretrained(classifier, classifier_dir, name="tiny-cxr-clf", label_names=["normal", "effusion"])
    film = get_testdata_file("RG1_UNCR.dcm")
    out = tmp_path / "maps" / "rollout.png"
    out.parent.mkdir()
    assert main(["explain", "--model", f"local-dir:{encoder_dir}", film, "--out", str(out)]) == 0
    assert "rollout" in capsys.readouterr().out
    assert main(["explain", "--model", f"local-dir:{classifier_dir}", film, "--out", str(tmp_path / "cam.png"),
                 "--target", "effusion"]) == 0
    assert "gradcam of effusion" in capsys.readouterr().out
    for png in (out, tmp_path / "cam.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 400
    assert main(["explain", "--model", f"local-dir:{classifier_dir}", film, "--out", str(tmp_path / "x.png"),
                 "--target", "nodule"]) == 2
    assert "'normal', 'effusion'" in capsys.readouterr().err
    assert main(["explain", "--model", f"local-dir:{encoder_dir}", str(tmp_path / "missing.dcm"), "--out",
                 str(tmp_path / "y.png")]) == 2
    assert "missing.dcm" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
