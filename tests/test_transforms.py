"""Eval and train transforms: the authors' numerics on 8-bit input, other input kinds, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ecamp
from ecamp.errors import InvalidImageError


def _authors_eval():
    # The authors' downstream test transform (Fine-tuning/Classification/utils/data_utils.py), torchvision v1.
    from torchvision import transforms as T

    return T.Compose([T.Resize(224), T.CenterCrop(224), T.Grayscale(num_output_channels=3), T.ToTensor(),
                      T.Normalize(mean=[0.4722], std=[0.3028])])


def _photo(h: int, w: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # a smooth image plus noise, so resampling differences would show
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    chans = [np.clip(base + rng.normal(0, 20, (h, w)) + 10 * c, 0, 255) for c in range(3)]
    if mode == "L":
        return Image.fromarray(chans[0].astype(np.uint8), "L")
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize("size", [(300, 400), (512, 256), (224, 224), (150, 170)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_eval_matches_authors_pipeline_on_8bit(size, mode):
    img = _photo(*size, mode)
    ours = ecamp.get_transform("cxr-vit-b")(img)
    ref = _authors_eval()(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_ndarray_tensor_and_batches_agree():
    tf = ecamp.get_transform("cxr-vit-b")
    img = _photo(260, 300, "L")
    arr = np.asarray(img)
    ref = tf(img)
    assert torch.equal(tf(arr), ref)
    assert torch.equal(tf(arr[:, :, None]), ref)
    assert torch.equal(tf(torch.from_numpy(arr.copy())[None]), ref)  # uint8 tensor [1, H, W]
    batch = tf([img, _photo(260, 300, "L", seed=1)])
    assert batch.shape == (2, 3, 224, 224) and torch.equal(batch[0], ref)
    assert torch.equal(tf(np.stack([arr, arr])[..., None]), torch.stack([ref, ref]))


def test_high_bit_depth_is_not_quantised():
    tf = ecamp.get_transform("cxr-vit-b", image_policy="bits")
    ramp16 = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    x16 = tf(ramp16)
    xf = tf(ramp16.astype(np.float32) / 65535)
    assert torch.allclose(x16, xf, atol=1e-6)
    # more distinct values than 8 bits could hold
    assert torch.unique(x16[0]).numel() > 256
    pil16 = Image.fromarray(ramp16)
    assert pil16.mode.startswith("I;16")
    assert torch.allclose(tf(pil16), x16, atol=1e-6)
    # float tensors in [0, 1], grey and colour
    t = torch.rand(3, 240, 250)
    assert tf(t).shape == (3, 224, 224)
    assert torch.allclose(tf(t[:1]), tf(t[0]), atol=0)


def test_colour_float_uses_luma_like_pil():
    tf = ecamp.get_transform("cxr-vit-b")
    rgb = _photo(224, 224, "RGB")
    as_float = np.asarray(rgb).astype(np.float32) / 255
    # 224x224 needs no resampling: float luma equals PIL's rounded luma within half a grey level
    assert torch.allclose(tf(as_float), tf(rgb), atol=0.5 / 255 / 0.3028 + 1e-6)


@pytest.mark.parametrize("bad, message", [
    (np.full((32, 32), np.nan, dtype=np.float32), "NaN"),
    (np.full((32, 32), np.inf, dtype=np.float32), "NaN or infinite"),
    (np.full((32, 32), 3.0, dtype=np.float32), r"scaled to \[0, 1\]"),
    (np.zeros((32, 32, 5), dtype=np.uint8), "shape"),
    (np.zeros((0, 32), dtype=np.uint8), "empty"),
    (np.zeros((32, 32), dtype=np.int64), "dtype"),
    (torch.zeros(5, 32, 32), "shape"),
    ([], "Empty batch"),
    (object(), "expected a PIL image"),
])
def test_bad_input_raises_specific_error(bad, message):
    with pytest.raises(InvalidImageError, match=message):
        ecamp.get_transform("cxr-vit-b")(bad)


def test_train_mode_augments_and_keeps_shape():
    tf = ecamp.get_transform("cxr-vit-b", train=True)
    img = _photo(300, 400, "L")
    torch.manual_seed(0)
    a = tf(img)
    b = tf(img)
    assert a.shape == (3, 224, 224) and not torch.equal(a, b)
    assert "RandomResizedCrop" in repr(tf) and "RandomHorizontalFlip" in repr(tf)


def test_overrides_repr_and_model_binding(tiny_folder):
    tf = ecamp.get_transform("cxr-vit-b", img_size=112, mean=[0.5] * 3)
    assert tf(_photo(200, 200, "L")).shape == (3, 112, 112)
    assert "Normalize(mean=[0.5, 0.5, 0.5]" in repr(tf) and "modality=cxr" in repr(tf)
    model = ecamp.load(f"local-dir:{tiny_folder}")
    tf_model = ecamp.get_transform(model)
    assert tf_model.cfg["input_size"] in ([3, 64, 64], (3, 64, 64))
    x = tf_model(_photo(100, 120, "RGB"))
    assert model(x[None]).shape == (1, 48)
    with pytest.raises(ecamp.EcampError, match="Unknown transform override"):
        ecamp.get_transform("cxr-vit-b", bogus=1)


def test_in_memory_16bit_follows_the_weights_policy(tmp_path):
    ramp16 = (np.linspace(0, 30000, 200 * 220) ** 1.2 / 30000**0.2).reshape(200, 220).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "x16.png")
    tf = ecamp.get_transform("cxr-vit-b")  # mimic-cxr-jpg: 8-bit min-max and histogram equalisation
    from_path = tf(tmp_path / "x16.png")
    assert torch.equal(tf(ramp16), from_path)
    assert torch.equal(tf(Image.open(tmp_path / "x16.png")), from_path)
    assert not torch.allclose(ecamp.get_transform("cxr-vit-b", image_policy="bits")(ramp16), from_path)


def test_crop_mode_is_honoured():
    from ecamp.errors import ConfigError

    wide = np.zeros((32, 64), np.uint8)
    wide[:, :8] = 255  # a bright band at the left edge: a centre crop cuts it away, squash keeps it
    cfg = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 1.0,
           "ecamp": {"grayscale": True}}
    centre = ecamp.get_transform(dict(cfg, crop_mode="center"))(wide)
    squash = ecamp.get_transform(dict(cfg, crop_mode="squash"))(wide)
    assert centre.shape == squash.shape == (3, 16, 16)
    assert centre[0, :, 0].max() < 0.01 and squash[0, :, 0].min() > 0.99
    with pytest.raises(ConfigError, match="crop_mode"):
        ecamp.get_transform(dict(cfg, crop_mode="border"))


# -- the two-halves pipeline (decode on the CPU, the rest in torch on a device), run here on the CPU ----------------
@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    from pydicom.data import get_testdata_file
    from skimage.data import retina

    from ecamp.io import read_image

    root = tmp_path_factory.mktemp("real")
    dcm = get_testdata_file("RG1_UNCR.dcm")  # 1955x1841, 15-bit MONOCHROME1
    film = read_image(dcm, policy="minmax")
    Image.fromarray((film * 255).round().astype(np.uint8)).save(root / "rg1.png")
    Image.fromarray((film * 65535).round().astype(np.uint16)).save(root / "rg1_16.png")
    photo = retina()[::2, ::2]
    framed = np.zeros((1100, 1300, 3), np.uint8)
    framed[75:75 + photo.shape[0], 200:200 + photo.shape[1]] = photo  # a fundus photo in a black frame
    Image.fromarray(framed).save(root / "fundus.png")
    return {"dicom": dcm, "png": root / "rg1.png", "png16": root / "rg1_16.png", "fundus": root / "fundus.png"}


# Stated tolerance of the torch half against the CPU path, in grey levels of the [0, 1] input (before
# normalisation): 8-bit images are resized as uint8 by both, torch's and Pillow's rounding differ by at most one
# level; float images agree to float rounding; colour to grey is float luma in torch, Pillow's rounded luma on the CPU.
@pytest.mark.parametrize("name, overrides, key, max_levels, mean_levels", [
    ("cxr-vit-b", {}, "dicom", 1, 0.01),  # mimic-cxr-jpg: table, equalisation, uint8 resize
    ("cxr-vit-b", {"image_policy": "bits"}, "dicom", 1e-3, 1e-4),
    ("cxr-vit-b", {"image_policy": "voi"}, "dicom", 1e-3, 1e-4),
    ("cxr-vit-b", {}, "png", 1, 0.01),
    ("cxr-vit-b", {}, "png16", 1, 0.01),
    ("cxr-vit-b", {}, "fundus", 1.5, 0.3),  # colour file into a grey model
    ("fundus-vit-b", {"fov_crop": True}, "fundus", 1.5, 0.3),
])
def test_device_half_matches_the_cpu_path_on_real_files(real_files, name, overrides, key, max_levels, mean_levels):
    tf = ecamp.get_transform(name, **overrides)
    ref = tf(real_files[key])
    got = tf.finish([tf.decode(real_files[key])], "cpu")
    assert got.shape == (1, *ref.shape) and got.dtype == torch.float32
    levels = (got[0] - ref).abs() * tf.std * 255
    assert levels.max() <= max_levels + 1e-4 and levels.mean() <= mean_levels, (levels.max(), levels.mean())


def test_device_half_keeps_order_across_sizes_kinds_and_cpu_fallbacks(real_files, tmp_path):
    from ecamp.transforms import DecodedImage

    tf = ecamp.get_transform("cxr-vit-b")
    small = _photo(300, 260, "L")
    small.save(tmp_path / "small.png")
    inputs = [real_files["dicom"], tmp_path / "small.png", small, real_files["png"], np.asarray(small)]
    decoded = [tf.decode(x) for x in inputs]
    assert decoded[0].table is not None and decoded[0].pixels.dtype == torch.int16  # uint16 bits, not yet mapped
    assert decoded[2].ready is not None and decoded[4].ready is not None  # in-memory: the CPU path, finished
    pinned_like = [d.to("cpu") for d in decoded]
    assert all(isinstance(d, DecodedImage) for d in pinned_like)
    batch = tf.finish(pinned_like)
    ref = tf(inputs)
    assert batch.shape == ref.shape == (5, 3, 224, 224)
    assert ((batch - ref).abs() * tf.std * 255).max() <= 1 + 1e-4
    assert torch.equal(batch[2], ref[2]) and torch.equal(batch[4], ref[4])
    with pytest.raises(InvalidImageError, match="channels"):
        ecamp.get_transform({"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}).decode(real_files["fundus"])


@pytest.mark.parametrize("policy", ["bits", "minmax", "voi"])
def test_linear_policies_resize_first_within_float_rounding(real_files, policy):
    from ecamp.io import read_image

    for overrides in ({}, {"interpolation": "bicubic", "img_size": 448}):
        tf = ecamp.get_transform("cxr-vit-b", image_policy=policy, **overrides)
        mapped_first = tf(read_image(real_files["dicom"], policy=policy))  # the film mapped, then resized
        assert ((tf(real_files["dicom"]) - mapped_first).abs() * tf.std).max() <= 3e-7
