"""The eval transform's fast path for 8-bit files (the decoded Pillow image kept, no array round trip; a grey film
stored as RGB resized as one channel) gives the bytes of the computation it replaces, on real films: RG1 as 8-bit
JPEG and PNG, grey and as RGB, a colour photograph, a palette image, a rotated JPEG and a grey+alpha PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file

import ecamp
from ecamp.io import decode_image, read_image_native

DICOM = get_testdata_file("RG1_UNCR.dcm")  # a real chest radiograph, 1955x1841, 15-bit MONOCHROME1


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eight-bit")
    grey = Image.fromarray((read_image_native(DICOM, policy="minmax") * 255).round().astype(np.uint8))
    rgb = grey.convert("RGB")
    rng = np.random.default_rng(0)
    colour = np.asarray(rgb).copy()
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + rng.integers(-20, 20, colour.shape[:2]), 0, 255)
    out = {"grey.jpg": grey, "grey.png": grey, "rgb.jpg": rgb, "rgb.png": rgb, "colour.png": Image.fromarray(colour),
           "palette.png": grey.convert("P"), "alpha.png": grey.convert("LA")}
    paths = {}
    for name, im in out.items():
        paths[name] = str(root / name)
        im.save(paths[name], quality=90) if name.endswith(".jpg") else im.save(paths[name])
    rotated = root / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees to be upright
    grey.save(rotated, quality=90, exif=exif)
    paths["rotated.jpg"] = str(rotated)
    return paths


def _pil_read(path: str) -> np.ndarray:
    """What the reader computed before: Pillow's image, turned upright (a copy), converted, as an array (these
    files' palettes are grey)."""
    im = ImageOps.exif_transpose(Image.open(path))
    return np.asarray(im.convert("RGB") if im.mode in ("RGB", "RGBA") else im.convert("L"), dtype=np.uint8)


def _old_transform(tf, path: str) -> torch.Tensor:
    """The eval transform as it was: the array, back into a Pillow image, the geometry on it (colour images resized
    in colour, made grey after), channels and normalisation."""
    arr = read_image_native(path, policy=tf.policy)
    img = Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")
    x = tf.geometry(img).as_subclass(torch.Tensor)
    return tf._channels_and_normalise(x, path)


@pytest.mark.parametrize("name", ["grey.jpg", "grey.png", "rgb.jpg", "rgb.png", "colour.png", "palette.png",
                                  "alpha.png", "rotated.jpg"])
def test_fast_path_is_byte_identical(files, name):
    path = files[name]
    arr = read_image_native(path, policy="mimic-cxr-jpg")
    np.testing.assert_array_equal(arr, _pil_read(path))
    im = decode_image(path, policy="mimic-cxr-jpg", pil=True)  # what the transform resizes
    assert isinstance(im, Image.Image) and im.mode == ("L" if arr.ndim == 2 else "RGB")
    np.testing.assert_array_equal(np.asarray(im), arr)
    if name == "rotated.jpg":
        assert arr.shape == (1841, 1955)  # turned upright
    for model in ("cxr-vit-b", "fundus-vit-b"):  # grey films and colour photographs
        tf = ecamp.get_transform(model)
        new = tf(path)
        assert new.shape == (3, 224, 224)
        assert torch.equal(new, _old_transform(tf, path)), (model, name)
    # the decode-only half and the batched call still see the same pixels
    tf = ecamp.get_transform("cxr-vit-b")
    assert torch.equal(tf([path, path])[1], tf(path))


def test_grey_stored_as_rgb_takes_the_one_channel_path(files):
    from ecamp.transforms import _grey_if_equal

    assert _grey_if_equal(Image.open(files["rgb.png"]).convert("RGB")).mode == "L"
    assert _grey_if_equal(Image.open(files["colour.png"]).convert("RGB")).mode == "RGB"
