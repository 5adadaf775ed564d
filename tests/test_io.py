"""Reading real and synthetic medical images: DICOM policies, PNG/JPEG/TIFF, bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import ecamp
from ecamp.errors import EcampError, ImageReadError, InvalidImageError, MissingDecoderError
from ecamp.io import equalize_hist, read_image

from helpers.builders import write_dicom


def _all_pydicom_files() -> list[Path]:
    import data_store  # the pydicom-data package: external test files, offline

    roots = [Path(pydicom.__file__).parent / "data" / "test_files", Path(data_store.__file__).parent]
    skip = (".py", ".pyc", ".json", ".txt", ".gz", ".bz2", ".md")
    return sorted(p for r in roots for p in r.rglob("*") if p.is_file() and not p.name.endswith(skip))


def test_every_pydicom_test_file_decodes_or_raises_a_clear_error():
    files = _all_pydicom_files()
    assert len(files) > 200
    decoded = 0
    for path in files:
        try:
            img = read_image(path)
        except InvalidImageError as e:
            # multi-frame files are a choice, not a failure: the first frame must then decode
            if "frame=" in str(e):
                img = read_image(path, frame=0)
            else:
                assert str(path) in str(e)
                continue
        assert img.dtype == np.float32 and img.ndim in (2, 3)
        assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1, path
        decoded += 1
    assert decoded >= 150


@pytest.fixture(scope="module")
def rg1() -> dict[str, str]:
    return {k: get_testdata_file(f"RG1_{k}.dcm") for k in ("UNCR", "J2KR", "J2KI")}


@pytest.mark.parametrize("policy", ["bits", "minmax", "voi", "mimic-cxr-jpg"])
def test_real_chest_radiograph_in_three_encodings(rg1, policy):
    ref = read_image(rg1["UNCR"], policy=policy)
    lossless = read_image(rg1["J2KR"], policy=policy)
    lossy = read_image(rg1["J2KI"], policy=policy)
    assert ref.shape == (1955, 1841)
    assert np.array_equal(ref, lossless)
    assert np.abs(ref - lossy).mean() < 0.01
    h, w = ref.shape
    # MONOCHROME1 is inverted: lungs dark, mediastinum and spine bright
    right_lung = ref[h // 3: h // 2, w // 5: w // 3].mean()
    left_lung = ref[h // 3: h // 2, 2 * w // 3: 4 * w // 5].mean()
    mediastinum = ref[h // 3: h // 2, int(w * 0.45): int(w * 0.55)].mean()
    assert mediastinum > right_lung + 0.15 and mediastinum > left_lung + 0.15


def test_mimic_policy_is_8bit_and_equalised(rg1):
    img = read_image(rg1["UNCR"], policy="mimic-cxr-jpg")
    levels = np.unique(np.rint(img * 255))
    assert np.allclose(img * 255, np.rint(img * 255), atol=1e-4)
    assert levels.min() == 0 and levels.max() == 255
    hist = np.bincount(np.rint(img * 255).astype(int).ravel(), minlength=256)
    cdf = np.cumsum(hist) / hist.sum()
    # equalised: the cumulative histogram is close to the identity line
    assert np.abs(cdf[levels.astype(int)] - levels / 255).max() < 0.05


def test_equalize_hist_matches_opencv_formula():
    img = np.array([[0, 0, 10, 10], [10, 50, 50, 200]], dtype=np.uint8)
    out = equalize_hist(img)
    # hist: 0->2, 10->3, 50->2, 200->1; n=8, first=2 -> lut = round((cdf-2)*255/6), halves to even as cvRound
    assert out.tolist() == [[0, 0, 128, 128], [128, 212, 212, 255]]
    assert np.array_equal(equalize_hist(np.full((3, 3), 7, np.uint8)), np.full((3, 3), 7, np.uint8))


def test_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))
    m2 = read_image(write_dicom(tmp_path, ramp, "m2.dcm", BitsStored=12, HighBit=11))
    m1 = read_image(write_dicom(tmp_path, ramp, "m1.dcm", BitsStored=12, HighBit=11,
                           PhotometricInterpretation="MONOCHROME1"))
    assert np.allclose(m1, 1 - m2, atol=1e-6)
    assert m2[0, 0] == 0 and m2[0, -1] == pytest.approx(4080 / 4095)


def test_bits_policy_uses_bitsstored_not_image_range(tmp_path):
    small = np.full((4, 4), 100, np.uint16)
    small[0, 0] = 200
    img = read_image(write_dicom(tmp_path, small, BitsStored=12, HighBit=11))
    assert img[1, 1] == pytest.approx(100 / 4095) and img[0, 0] == pytest.approx(200 / 4095)
    mm = read_image(tmp_path / "x.dcm", policy="minmax")
    assert mm[1, 1] == 0 and mm[0, 0] == 1


def test_rescale_slope_intercept_and_signed(tmp_path):
    stored = np.array([[-2048, 0], [1000, 2047]], dtype=np.int16)
    path = write_dicom(tmp_path, stored, BitsStored=12, HighBit=11, RescaleSlope=2, RescaleIntercept=-1000)
    img = read_image(path)
    # the 12-bit signed range [-2048, 2047] maps through the modality LUT to [-5096, 3094]
    expected = (stored.astype(float) * 2 - 1000 + 5096) / (3094 + 5096)
    assert np.allclose(img, expected, atol=1e-6)
    # windowing in modality units: centre 0, width 2000 -> stored 500 (value 0) is mid-grey
    win = write_dicom(tmp_path, np.array([[0, 500], [1000, 2047]], np.int16), "w.dcm", BitsStored=12, HighBit=11,
                 RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2000)
    w = read_image(win, policy="voi")
    assert w[0, 0] == 0 and w[0, 1] == pytest.approx(0.5, abs=0.01) and w[1, 0] == 1 and w[1, 1] == 1
    with pytest.raises(InvalidImageError, match="WindowCenter"):
        read_image(path, policy="voi")


def test_pixel_padding_is_excluded_and_black(tmp_path):
    arr = np.full((8, 8), 500, np.uint16)
    arr[2:6, 2:6] = 1500
    arr[:, 0] = 4095  # padding (as some MONOCHROME1 detectors write it)
    img = read_image(write_dicom(tmp_path, arr, BitsStored=12, HighBit=11, PixelPaddingValue=4095), policy="minmax")
    assert img[0, 0] == 0 and img[3, 3] == 1 and img[0, 4] == 0
    eq = read_image(tmp_path / "x.dcm", policy="mimic-cxr-jpg")
    assert eq[:, 0].max() == 0 and eq[3, 3] == 1


def test_sixteen_bit_png_and_policies(tmp_path):
    ramp = np.linspace(1000, 40000, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(ramp).save(path)
    img = read_image(path)
    assert np.allclose(img, ramp / 65535, atol=1e-6)
    assert read_image(path, policy="minmax").max() == 1
    eq = read_image(path, policy="mimic-cxr-jpg")
    assert eq.min() == 0 and eq.max() == 1


def test_jpeg_exif_orientation_bytes_and_file_objects(tmp_path):
    arr = np.zeros((40, 80), np.uint8)
    arr[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    img = read_image(data)
    assert img.shape == (80, 40)
    assert img[:35].mean() > 0.9 and img[45:].mean() < 0.1  # white is now on top
    assert np.array_equal(read_image(io.BytesIO(data)), img)
    (tmp_path / "x.jpg").write_bytes(data)
    with open(tmp_path / "x.jpg", "rb") as f:
        assert np.array_equal(read_image(f), img)


def test_multipage_tiff_needs_a_frame(tmp_path):
    pages = [Image.fromarray(np.full((10, 10), v, np.uint8)) for v in (10, 200)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(InvalidImageError, match="frame"):
        read_image(tmp_path / "m.tif")
    assert read_image(tmp_path / "m.tif", frame=1)[0, 0] == pytest.approx(200 / 255)


def test_rgb_and_multiframe_dicom(tmp_path):
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0] = 255
    img = read_image(write_dicom(tmp_path, rgb, "rgb.dcm", SamplesPerPixel=3, PhotometricInterpretation="RGB"))
    assert img.shape == (6, 5, 3) and img[..., 0].min() == 1 and img[..., 1].max() == 0
    frames = np.stack([np.full((4, 4), v, np.uint16) for v in (0, 4095)])
    path = write_dicom(tmp_path, frames, "mf.dcm", BitsStored=12, HighBit=11)
    with pytest.raises(InvalidImageError, match="2 frames"):
        read_image(path)
    assert read_image(path, frame=1).min() == 1
    with pytest.raises(InvalidImageError, match="frame 2"):
        read_image(path, frame=2)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (_png_header_only(100_000, 100_000), "pixel limit"),
])
def test_bad_bytes(data, message):
    with pytest.raises(ImageReadError, match=message):
        read_image(data)


def test_bad_files(tmp_path, rg1):
    truncated = tmp_path / "t.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(truncated)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(Path(rg1["UNCR"]).read_bytes()[:200_000])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(cut)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)
    with pytest.raises(ImageReadError, match="cannot open"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(get_testdata_file("rtplan.dcm"))
    with pytest.raises(ImageReadError, match="pixel limit"):
        read_image(rg1["UNCR"], max_pixels=1_000_000)
    with pytest.raises(InvalidImageError, match="policy"):
        read_image(rg1["UNCR"], policy="pretty")


def test_missing_decoder_names_file_syntax_and_extra(monkeypatch, rg1):
    from pydicom.pixels.decoders.base import Decoder

    # Simulate an installation without the JPEG 2000 plugins (Pillow and pylibjpeg-openjpeg both absent).
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    monkeypatch.setattr(Decoder, "missing_dependencies", property(lambda self: {"pylibjpeg": ["pylibjpeg-openjpeg"]}))
    with pytest.raises(MissingDecoderError) as err:
        read_image(rg1["J2KR"])
    msg = str(err.value)
    assert "RG1_J2KR.dcm" in msg and "JPEG 2000" in msg and 'pip install "ecamp[dicom]"' in msg
    assert isinstance(err.value, ImportError) and isinstance(err.value, EcampError)
    read_image(rg1["UNCR"])  # uncompressed needs no plugin


def test_transform_reads_dicom_with_the_weights_policy(rg1):
    tf = ecamp.get_transform("cxr-vit-b")
    x = tf(rg1["UNCR"])
    assert x.shape == (3, 224, 224)
    # the CXR policy yields 8-bit levels, which take the authors' exact 8-bit path
    native = (read_image(rg1["UNCR"], policy="mimic-cxr-jpg") * 255).round().astype(np.uint8)
    assert torch.equal(x, tf(native))
    assert torch.allclose(tf(rg1["J2KR"]), x)
    batch = tf([rg1["UNCR"], rg1["J2KI"]])
    assert batch.shape == (2, 3, 224, 224)
    windowed = ecamp.get_transform("cxr-vit-b", image_policy="voi")(rg1["UNCR"])
    assert not torch.allclose(windowed, x)


def test_fundus_fov_crop_on_real_retina(tmp_path):
    from skimage.data import retina

    from ecamp.fundus import fov_bbox, fov_crop

    r = retina()
    framed = np.zeros((1700, 2100, 3), np.uint8)
    framed[150:150 + r.shape[0], 500:500 + r.shape[1]] = r
    t, b, left, right = fov_bbox(framed)
    assert abs(t - 150) < 20 and abs(b - (150 + r.shape[0])) < 20
    assert abs(left - 500) < 20 and abs(right - (500 + r.shape[1])) < 20
    cropped = fov_crop(framed)
    assert cropped.shape[0] == cropped.shape[1] and cropped.dtype == np.uint8
    tf = ecamp.get_transform("fundus-vit-b", fov_crop=True)
    Image.fromarray(framed).save(tmp_path / "framed.png")
    a, b2 = tf(r), tf(tmp_path / "framed.png")
    assert (a - b2).abs().mean() < 0.02
    plain = ecamp.get_transform("fundus-vit-b")(tmp_path / "framed.png")
    assert (plain - a).abs().mean() > 0.1  # without the crop the black frame changes the input a lot
    assert fov_bbox(np.zeros((50, 50), np.uint8)) is None


def test_corrupted_dicom_files_never_escape_as_other_errors():
    """Truncated and bit-flipped copies of real files: every failure is an EcampError naming the input."""
    rng = np.random.default_rng(0)
    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "RG1_J2KI.dcm", "SC_rgb_rle.dcm", "emri_small_RLE.dcm",
             "JPGLosslessP14SV1_1s_1f_8b.dcm", "US1_J2KR.dcm"]
    variants = 0
    for name in names:
        data = Path(get_testdata_file(name)).read_bytes()
        cuts = [132, 300, len(data) // 3, len(data) - 10]
        flips = []
        for _ in range(6):
            b = bytearray(data)
            for pos in rng.integers(128, min(len(b), 2000), size=4):
                b[pos] ^= 0xFF
            flips.append(bytes(b))
        for blob in [data[:c] for c in cuts] + flips:
            variants += 1
            try:
                read_image(blob)
            except EcampError:
                pass
    assert variants == len(names) * 10


# -- the table-driven fast paths against the per-pixel float64 definitions -------------------------------------------
def _equalize_reference(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """OpenCV's equalizeHist per its definition, with numpy's bincount (what the fast one replaced)."""
    hist = np.bincount((img[mask] if mask is not None else img).ravel(), minlength=256)
    nonzero = np.flatnonzero(hist)
    if hist.sum() == 0 or hist[nonzero[0]] == hist.sum():
        return img.copy()
    first, cdf = int(hist[nonzero[0]]), np.cumsum(hist)
    lut = np.clip(np.rint((cdf - first) * (255.0 / (hist.sum() - first))), 0, 255).astype(np.uint8)
    lut[: nonzero[0]] = 0
    return lut[img]


def _policy_reference(stored: np.ndarray, policy: str, slope: float, intercept: float, bits: int, signed: bool,
                      invert: bool) -> np.ndarray:
    """The intensity policies per pixel in float64, as their definitions in ecamp.io state them."""
    values = stored.astype(np.float64) * slope + intercept
    if policy == "bits":
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]) * slope + intercept
        out = np.clip((values - ends.min()) / (ends.max() - ends.min()), 0, 1).astype(np.float32)
        return 1.0 - out if invert else out
    lo, hi = values.min(), values.max()
    if policy == "minmax":
        out = np.clip((values - lo) / (hi - lo), 0, 1).astype(np.float32)
        return 1.0 - out if invert else out
    u8 = np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return _equalize_reference(255 - u8 if invert else u8)


@pytest.mark.parametrize("levels", [256, 7, 2])
def test_table_equalisation_equals_the_definition_exactly(levels):
    rng = np.random.default_rng(levels)
    for shape in [(97, 61), (1, 300), (5, 4, 3)]:
        img = (rng.integers(0, levels, shape) * (255 // max(levels - 1, 1))).astype(np.uint8)
        img.flat[0] = 3  # a level below the others' minimum on some draws
        assert np.array_equal(equalize_hist(img), _equalize_reference(img))
        mask = rng.random(shape) > 0.3
        assert np.array_equal(equalize_hist(img, mask), _equalize_reference(img, mask))
    constant = np.full((9, 9), 42, np.uint8)
    assert np.array_equal(equalize_hist(constant), constant)
    with pytest.raises(InvalidImageError, match="uint8"):
        equalize_hist(np.zeros((4, 4), np.uint16))


def test_table_equalisation_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(5):
        img = np.clip(rng.normal(90, 40, (123, 77)), 0, 255).astype(np.uint8)
        assert np.array_equal(equalize_hist(img), cv2.equalizeHist(img))


@pytest.mark.parametrize("signed, bits, slope, intercept, photometric", [
    (False, 15, None, None, "MONOCHROME1"),  # as RG1
    (False, 12, 2.5, -1024.0, "MONOCHROME2"),
    (True, 12, 1.0, -1000.0, "MONOCHROME2"),
    (True, 16, -0.75, 10.0, "MONOCHROME1"),  # a decreasing rescale: the extremes swap ends
    (False, 8, None, None, "MONOCHROME2"),
])
def test_dicom_policy_tables_equal_the_per_pixel_definition(tmp_path, signed, bits, slope, intercept, photometric):
    rng = np.random.default_rng(bits)
    half = 2 ** (bits - 1)
    lo, hi = (-half, half - 1) if signed else (0, 2 * half - 1)
    dtype = (np.int8 if signed else np.uint8) if bits == 8 else (np.int16 if signed else np.uint16)
    stored = np.clip(rng.normal((lo + hi) / 2, (hi - lo) / 8, (70, 90)), lo, hi).astype(dtype)
    attrs = dict(BitsStored=bits, HighBit=bits - 1, PhotometricInterpretation=photometric)
    if slope is not None:
        attrs.update(RescaleSlope=slope, RescaleIntercept=intercept)
    path = write_dicom(tmp_path, stored, **attrs)
    for policy in ("bits", "minmax", "mimic-cxr-jpg"):
        expected = _policy_reference(stored, policy, slope or 1.0, intercept or 0.0, bits, signed,
                                     photometric == "MONOCHROME1")
        got = ecamp.io.read_image_native(path, policy=policy)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), policy


def test_sixteen_bit_tables_equal_the_per_pixel_definition(tmp_path):
    from ecamp.io import apply_policy_to_grey

    rng = np.random.default_rng(3)
    arr = np.clip(rng.normal(20000, 9000, (66, 54)), 0, 65535).astype(np.uint16)
    for policy in ("bits", "minmax", "mimic-cxr-jpg"):
        got = apply_policy_to_grey(arr, policy)
        v = arr.astype(np.float64)
        if policy == "bits":
            expected = np.clip(v / 65535.0, 0, 1).astype(np.float32)
        elif policy == "minmax":
            expected = np.clip((v - v.min()) / (v.max() - v.min()), 0, 1).astype(np.float32)
        else:
            expected = _equalize_reference(np.clip(np.rint((v - v.min()) * (255.0 / (v.max() - v.min()))), 0, 255)
                                           .astype(np.uint8))
        assert got.dtype == expected.dtype and np.array_equal(got, expected), policy
        Image.fromarray(arr).save(tmp_path / "x16.png")
        assert np.array_equal(ecamp.io.read_image_native(tmp_path / "x16.png", policy=policy), got), policy


def test_equalisation_table_divides_as_the_definition_at_a_near_tie():
    # 50 * 255 / 300 = 42.5 in exact arithmetic; 255.0 / 300 rounds below 0.85, so the product is 42.49999... -> 42.
    # (Multiplying by the reciprocal 1 / 300 instead gives 42.5000... -> 43.)
    img = np.repeat(np.array([0, 1, 4, 16, 64, 127, 255], np.uint8), [200, 50, 50, 50, 50, 50, 50]).reshape(50, 10)
    out = equalize_hist(img)
    assert np.array_equal(out, _equalize_reference(img)) and out[img == 1].max() == 42
    cv2 = pytest.importorskip("cv2")
    assert np.array_equal(out, cv2.equalizeHist(img))


def test_unused_high_bits_are_cleared_as_pydicom_does(tmp_path):
    rng = np.random.default_rng(5)
    stored = rng.integers(0, 4096, (40, 30)).astype(np.uint16)
    dirty = stored | (rng.integers(0, 16, stored.shape).astype(np.uint16) << 12)  # overlay bits above BitsStored
    signed = rng.integers(-2048, 2048, (40, 30)).astype(np.int16)
    dirty_signed = (signed & 0x0FFF | 0x5000).astype(np.uint16).view(np.int16)  # 12-bit two's complement, junk above
    cases = [(dirty, stored, False), (stored, stored, False), (dirty_signed, signed, True)]
    for k, (raw, clean, is_signed) in enumerate(cases):
        path = write_dicom(tmp_path, raw, f"u{k}.dcm", BitsStored=12, HighBit=11)
        assert np.array_equal(pydicom.dcmread(path).pixel_array, clean)  # pydicom's own correction, the reference
        for policy in ("bits", "minmax", "mimic-cxr-jpg"):
            expected = _policy_reference(clean, policy, 1.0, 0.0, 12, is_signed, False)
            assert np.array_equal(ecamp.io.read_image_native(path, policy=policy), expected), (k, policy)


def test_decoded_tables_apply_to_what_read_image_native_returns(rg1, tmp_path):
    from ecamp.io import TableImage, decode_image, read_image_native

    for policy in ("bits", "minmax", "voi", "mimic-cxr-jpg"):
        decoded = decode_image(rg1["UNCR"], policy=policy)
        assert isinstance(decoded, TableImage) and decoded.index.shape == (1955, 1841)
        assert decoded.index.dtype == np.uint16 and decoded.table.shape == (65536,)
        assert decoded.equalize == (policy == "mimic-cxr-jpg")
        assert (decoded.affine is None) == (policy == "mimic-cxr-jpg")  # RG1's rescale and window are linear
        assert np.array_equal(decoded.apply(), read_image_native(rg1["UNCR"], policy=policy))
    arr = np.full((8, 8), 500, np.uint16)
    arr[2:6, 2:6] = 1500
    arr[:, 0] = 4095
    padded = decode_image(write_dicom(tmp_path, arr, BitsStored=12, HighBit=11, PixelPaddingValue=4095),
                          policy="mimic-cxr-jpg")
    assert padded.pad is not None and padded.pad[:, 0].all() and not padded.pad[:, 1:].any()
    assert decode_image(tmp_path / "x.dcm", policy="minmax").affine is None  # padding to black is not linear
    assert not isinstance(decode_image(get_testdata_file("SC_rgb.dcm")), TableImage)  # colour: final already


def test_one_pass_8bit_map_is_taken_only_where_it_equals_the_table(rg1, tmp_path):
    cv2 = pytest.importorskip("cv2")
    import ecamp.io as eio

    rng = np.random.default_rng(3)
    ramp = rng.integers(40, 3000, (64, 48)).astype(np.uint16)
    cases = {  # (file, policy): whether OpenCV's convertScaleAbs reproduces the 8-bit table
        rg1["UNCR"]: True,  # 15-bit MONOCHROME1: inverted
        write_dicom(tmp_path, ramp, "slope.dcm", BitsStored=12, HighBit=11, RescaleSlope=2.5,
                    RescaleIntercept=-1024): True,
        get_testdata_file("mlut_18.dcm"): False,  # a modality LUT table: not linear in the stored value
    }
    Image.fromarray(ramp * 16).save(tmp_path / "x16.png")
    cases[tmp_path / "x16.png"] = True
    for path, fast in cases.items():
        decoded = eio.decode_image(path, policy="mimic-cxr-jpg")
        assert (decoded.scale_abs is not None) == fast, path
        if fast:
            one_pass = cv2.convertScaleAbs(decoded.index, alpha=decoded.scale_abs[0], beta=decoded.scale_abs[1])
            assert np.array_equal(one_pass, eio.tables._gather(decoded.table, decoded.index)), path
    # the check is what guards it: a table one entry away from OpenCV's arithmetic is refused
    decoded = eio.decode_image(rg1["UNCR"], policy="mimic-cxr-jpg")
    lo, hi = int(decoded.index.min()), int(decoded.index.max())
    values = np.arange(65536, dtype=np.float64)
    table = decoded.table.copy()
    assert eio.tables._scale_abs(table, values, lo, hi, True, lo, hi) is not None
    table[(lo + hi) // 2] ^= 1
    assert eio.tables._scale_abs(table, values, lo, hi, True, lo, hi) is None


def test_opencv_look_up_equals_numpy(rg1, monkeypatch):
    pytest.importorskip("cv2")
    import ecamp.io as eio

    with_cv2 = eio.read_image_native(rg1["UNCR"], policy="mimic-cxr-jpg")
    monkeypatch.setattr(eio.tables, "_CV2", False)  # as if OpenCV were not installed
    assert eio.tables._opencv() is None
    assert np.array_equal(eio.read_image_native(rg1["UNCR"], policy="mimic-cxr-jpg"), with_cv2)
