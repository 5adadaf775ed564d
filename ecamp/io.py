"""Reading medical images: DICOM, PNG (8/16-bit), JPEG, TIFF, into float32 arrays in [0, 1].

Grey images come back as ``[H, W]``, colour as ``[H, W, 3]``. DICOM goes through the modality LUT
(RescaleSlope/Intercept or a Modality LUT Sequence), then an explicit *intensity policy* maps the values to [0, 1],
and MONOCHROME1 is inverted so that, as in every display convention, bone and air are bright and dark:

``"bits"`` (default of :func:`read_image`)
    scale by the value range that BitsStored and PixelRepresentation allow (after the modality LUT). The same stored
    value always gives the same output, whatever else is in the image.
``"minmax"``
    per-image min-max of the modality values (PixelPaddingValue pixels excluded).
``"voi"``
    the file's VOI LUT or WindowCenter/WindowWidth (pydicom's ``apply_voi_lut``), scaled by its output range.
``"mimic-cxr-jpg"`` (default of the CXR weights)
    how MIMIC-CXR-JPG, the images the CXR weights saw, was made from DICOM: min-max to 8 bits, MONOCHROME1
    inversion, histogram equalisation (OpenCV ``equalizeHist`` semantics). The JPEG compression step is not
    reproduced. 8-bit PNG/JPEG files are taken as already processed and left alone.

Files with more than 8 bits but no DICOM header (16-bit PNG/TIFF) follow the same policies without the DICOM steps.
Compressed DICOM transfer syntaxes decode through pydicom's plugins (``pip install "ecamp[dicom]"``).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from .errors import ImageReadError, InvalidImageError, MissingDecoderError

__all__ = ["read_image", "read_image_native", "decode_image", "TableImage", "POLICIES", "DEFAULT_MAX_PIXELS",
           "equalize_hist", "equalize_lut", "is_dicom", "apply_policy_to_grey"]

logger = logging.getLogger("ecamp")

# Guard against decompression bombs: about 11585 x 11585 pixels, 7x the largest radiographs in common use.
DEFAULT_MAX_PIXELS = int(os.environ.get("ECAMP_MAX_IMAGE_PIXELS", 2**27))
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# How files become intensities (module docstring); the manifest's image_policy is one of these.
POLICIES = ("bits", "minmax", "voi", "mimic-cxr-jpg")
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def _source_path(src: Any) -> str | None:
    """The file an image source is: a path, or a file object's ``name``; ``None`` for bytes and anonymous streams."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return None
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else None


class _DicomFile(str):
    """A path :func:`_open` found to be DICOM, for pydicom to read directly."""


def _open(src: ImageSource) -> tuple[str, bytes | _DicomFile]:
    """Name and content of a path, a byte string or a binary file object (a DICOM path stays a path, as a
    :class:`_DicomFile`); refuses what cannot be an image file."""
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            st = path.stat()
        except OSError as e:
            raise ImageReadError(f"{name}: cannot open ({e.strerror or e}).", path=path) from e
        if not stat.S_ISREG(st.st_mode):  # directories, FIFOs, devices: reading could hang or mean nothing
            raise ImageReadError(f"{name}: not a regular file.", path=path)
        try:
            with open(path, "rb") as f:
                head = f.read(132)
                # DICOM is parsed from the file itself: reading it into memory first would copy the pixel data twice
                data = _DicomFile(path) if head and is_dicom(head, name) else head + f.read()
        except OSError as e:
            raise ImageReadError(f"{name}: cannot read ({e.strerror or e}).", path=path) from e
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, bytes):
            raise ImageReadError(f"{name}: file object must be opened in binary mode.", path=_source_path(src))
    else:
        raise InvalidImageError(f"Cannot read an image from a {type(src).__name__}; pass a path, bytes or a binary "
                                f"file object.")
    if not data:
        raise ImageReadError(f"{name}: empty file.", path=_source_path(src))
    return name, data


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM Part 10 preamble, or a DICOM file extension (for files written without the preamble)."""
    return data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES)


def equalize_hist(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Histogram equalisation of a uint8 image with OpenCV's ``equalizeHist`` mapping.

    ``lut[v] = round((cdf[v] - cdf[v_min]) * 255 / (n - cdf[v_min]))``; pixels outside ``mask`` do not count.
    The histogram is Pillow's (a C loop, several times faster than numpy's ``bincount`` on a full-size film), the
    table :func:`equalize_lut`, the mapping one table look-up.
    """
    import torch
    from PIL import Image

    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise InvalidImageError(f"equalize_hist takes a uint8 image, not {img.dtype}; scale it to 8 bits first.")
    if img.size == 0:
        return img.copy()
    im = Image.fromarray(np.ascontiguousarray(_as_2d(img)))
    hist = im.histogram(None if mask is None else Image.fromarray(
        np.ascontiguousarray(np.broadcast_to(mask, img.shape).reshape(im.size[::-1]), dtype=np.uint8)))
    return _gather(equalize_lut(torch.tensor(hist)).numpy(), img)


def equalize_lut(hist: Any) -> Any:
    """OpenCV's ``equalizeHist`` table (uint8) for a 256-bin histogram (an int64 tensor on any device); the identity
    for a constant or empty image, which OpenCV leaves unchanged.

    Written in torch so that the device preprocessing (:meth:`ecamp.transforms.EcampTransform.finish`) computes it
    where the histogram is, without a round trip to the host; float64 and round-half-to-even as OpenCV's ``cvRound``.
    Levels below the lowest occurring one come out 0 (their cdf is 0).
    """
    import torch

    cdf = hist.cumsum(0)
    total = cdf[-1]
    first = hist[(hist > 0).to(torch.int32).argmax()]  # count of the lowest occurring level
    # a true division (a python number over a tensor would multiply by the reciprocal, one rounding more)
    scale = torch.full((), 255.0, dtype=torch.float64, device=hist.device) / (total - first).clamp_min(1)
    lut = ((cdf - first).to(torch.float64) * scale).round().clamp(0, 255).to(torch.uint8)
    return torch.where(first == total, torch.arange(256, dtype=torch.uint8, device=hist.device), lut)


def _to_unit_8bit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max from [lo, hi] to uint8 [0, 255] (rounded)."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # table entries for values no pixel has may be non-finite
        return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _minmax(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _stored_range(arr: np.ndarray) -> tuple[int, int]:
    """Lowest and highest stored integer value: OpenCV's ``minMaxLoc`` (one pass) for the 2-D dtypes it takes, else
    numpy's ``min`` and ``max``."""
    cv2 = _opencv() if arr.ndim == 2 and arr.size and arr.dtype in _MINMAX_DTYPES else None
    if cv2 is not None:
        lo, hi, _, _ = cv2.minMaxLoc(arr)
        return int(lo), int(hi)
    return int(arr.min()), int(arr.max())


_MINMAX_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.int32))


def _extremes(values: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    v = values[valid] if valid is not None else values
    return float(v.min()), float(v.max())


# Integer pixels of at most 16 bits go through a look-up table over every value their dtype can hold: the intensity
# policy is computed once per possible value with the same float64 expressions as per pixel (so the result is
# bit-identical), and one gather maps the image. On a 2k x 2k film this replaces several full-size float64 passes.
_LUT_INDEX = {np.dtype(np.uint8): np.uint8, np.dtype(np.int8): np.uint8, np.dtype(np.uint16): np.uint16,
              np.dtype(np.int16): np.uint16}


def _lut_index(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(index, domain)``: ``arr`` viewed as unsigned table indices and the stored value each index stands for;
    ``None`` for dtypes the table does not cover (32-bit, float)."""
    unsigned = _LUT_INDEX.get(arr.dtype)
    if unsigned is None:
        return None
    return arr.view(unsigned), np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)


def _as_2d(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1, arr.shape[-1]) if arr.ndim >= 2 else arr.reshape(1, -1)


def _opencv() -> Any:
    """OpenCV when installed (``opencv-python-headless``, the ``[fast]`` extra): its 8-bit table look-up, one-pass
    linear 16-to-8-bit map (checked against the table) and min/max are exact and several times faster than the
    numpy/torch equivalents. Optional: without it the same results come from those."""
    global _CV2
    if _CV2 is None:
        try:
            import cv2
        except ImportError:
            cv2 = False
        _CV2 = cv2
    return _CV2 or None


_CV2: Any = None


def _gather(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]``: OpenCV's ``LUT`` for an 8-bit table over 8-bit indices when OpenCV is installed; else
    torch's ``index_select`` with int32 indices (numpy converts indices to 64-bit before a gather: on a full-size
    16-bit film torch's gather is about 1.7x faster)."""
    import torch

    cv2 = _opencv() if table.dtype == np.uint8 and index.dtype == np.uint8 and table.size == 256 else None
    if cv2 is not None and index.size:
        return cv2.LUT(np.ascontiguousarray(_as_2d(index)), table).reshape(index.shape)
    flat = torch.from_numpy(index.reshape(-1).astype(np.int32))
    return torch.index_select(torch.from_numpy(table), 0, flat).numpy().reshape(index.shape)


def _scale_abs(table: np.ndarray, values: np.ndarray, lo: float, hi: float, invert: bool, first: int, last: int
               ) -> tuple[float, float] | None:
    """``(alpha, beta)`` when OpenCV's ``convertScaleAbs(i, alpha, beta)`` equals the 8-bit min-max ``table`` at every
    uint16 index ``first..last`` (checked there, so the image it maps comes out identical to ``table[index]``): the
    values are linear in the index and OpenCV's float rounding agrees with the table's. One SIMD pass instead of a
    gather; ``None`` without OpenCV or when any entry differs."""
    cv2 = _opencv()
    if cv2 is None or hi <= lo:
        return None
    fit = _affine(values, first, last, tol=1e-9 * max(1.0, float(np.abs(values[[first, last]]).max())))
    if fit is None:
        return None
    k = 255.0 / (hi - lo)
    alpha, beta = fit[0] * k, (fit[1] - lo) * k
    if invert:
        alpha, beta = -alpha, 255.0 - beta
    domain = np.arange(first, last + 1, dtype=np.uint16)[None]
    ok = np.array_equal(cv2.convertScaleAbs(domain, alpha=alpha, beta=beta)[0], table[first:last + 1])
    return (alpha, beta) if ok else None


@dataclass(frozen=True, eq=False)
class TableImage:
    """A grey image whose intensity policy is a table over its stored values, decoded but not yet mapped.

    :meth:`apply` gives what :func:`read_image_native` returns: ``table[index]``, then, when ``equalize`` (the
    ``mimic-cxr-jpg`` policy), histogram equalisation over the pixels outside ``pad``, then ``pad`` pixels set
    to 0. :meth:`ecamp.transforms.EcampTransform.finish` runs the same steps in torch on the device.
    """

    index: np.ndarray  # [H, W] uint8 or uint16: the stored values viewed as unsigned table indices
    table: np.ndarray  # uint8 (8-bit policies) or float32 in [0, 1], one entry per possible index value
    equalize: bool = False
    pad: np.ndarray | None = None  # bool [H, W]: PixelPaddingValue pixels
    # (scale, offset) when table[i] is scale * i + offset at every index in the image (to float32 rounding): a
    # linear resize may then run on the indices first and the mapping on its output (EcampTransform does)
    affine: tuple[float, float] | None = None
    # (alpha, beta) when OpenCV's convertScaleAbs(index, alpha, beta) is table[index] at every index in the image
    # (checked on the table: _scale_abs); the CPU path then maps the film in one pass instead of a gather
    scale_abs: tuple[float, float] | None = None

    def apply(self) -> np.ndarray:
        cv2 = _opencv() if self.scale_abs is not None else None
        mapped = cv2.convertScaleAbs(_as_2d(self.index), alpha=self.scale_abs[0], beta=self.scale_abs[1]).reshape(
            self.index.shape) if cv2 is not None else _gather(self.table, self.index)
        return _finish(mapped, self.equalize, self.pad)


def _finish(out: np.ndarray, equalize: bool, pad: np.ndarray | None) -> np.ndarray:
    """The steps of a policy after the per-pixel mapping: equalisation (8-bit), padding to black."""
    if equalize:
        out = equalize_hist(out, None if pad is None else ~pad)
    if pad is not None:
        out[pad] = 0
    return out


def _resolve(decoded: np.ndarray | TableImage) -> np.ndarray:
    return decoded.apply() if isinstance(decoded, TableImage) else decoded


def _table_extremes(arr: np.ndarray, index: np.ndarray, table: np.ndarray,
                    valid: np.ndarray | None) -> tuple[float, float, int, int]:
    """Min and max of ``table[index]`` over the (valid) pixels without mapping the image: from the stored range
    when the table is monotone there (any rescale is), else from the values that occur; then the stored range."""
    lo, hi = _stored_range(arr if valid is None else arr[valid])
    span = table[np.arange(lo, hi + 1).astype(arr.dtype).view(index.dtype)]
    if np.isfinite(span).all():
        step = np.diff(span)
        if (step >= 0).all() or (step <= 0).all():
            return float(min(span[0], span[-1])), float(max(span[0], span[-1])), lo, hi
    sel_index = index if valid is None else index[valid]
    occurring = table[np.bincount(sel_index.ravel(), minlength=table.size) > 0]
    return float(occurring.min()), float(occurring.max()), lo, hi


def _affine(table: np.ndarray, lo: int, hi: int, tol: float = 4e-7) -> tuple[float, float] | None:
    """``(scale, offset)`` when a float table is ``scale * i + offset`` to within ``tol`` (by default float32 rounding,
    a few ulp of [0, 1] values) at every index ``i`` in ``lo..hi`` (a rescale under ``bits`` or ``minmax``, a window
    that does not clip there)."""
    if table.dtype not in (np.float32, np.float64):
        return None
    t = table[lo:hi + 1].astype(np.float64)
    scale = (t[-1] - t[0]) / (hi - lo) if hi > lo else 0.0
    offset = t[0] - scale * lo
    fits = np.abs(t - (scale * np.arange(lo, hi + 1) + offset)).max() <= tol
    return (float(scale), float(offset)) if fits else None


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise InvalidImageError(f"Unknown intensity policy {policy!r}; use one of {POLICIES}.")


# --------------------------------------------------------------------------------------------------------------------
# DICOM


def _dicom_decoder_check(ds: Any, name: str) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import ImplicitVRLittleEndian

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ImplicitVRLittleEndian
    if not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise ImageReadError(f"{name}: transfer syntax {ts} ({ts.name}) has no pixel decoder in pydicom.") from e
    if not decoder.is_available:
        missing = "; ".join(f"{plugin}: {', '.join(deps)}" for plugin, deps in decoder.missing_dependencies.items()
                            if deps) if isinstance(decoder.missing_dependencies, dict) else ""
        raise MissingDecoderError(
            f"{name}: pixel data is compressed as {ts.name} ({ts}) and no installed decoder handles it"
            + (f" (missing {missing})" if missing else "")
            + ". Install the DICOM codecs: pip install \"ecamp[dicom]\"."
        )


def _bits_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _padding_mask(ds: Any, stored: np.ndarray) -> np.ndarray | None:
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is not None:
        lo, hi = sorted((int(pad), int(limit)))
        mask = (stored >= lo) & (stored <= hi)
    else:
        mask = stored == int(pad)
    return mask if mask.any() else None


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files written without File Meta Information: record the encoding pydicom read them with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def _read_dicom(name: str, data: bytes | _DicomFile, policy: str, frame: int | None, max_pixels: int
                ) -> np.ndarray | TableImage:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header quirks pydicom can read past; what matters is checked below
            ds = pydicom.dcmread(str(data) if isinstance(data, _DicomFile) else io.BytesIO(data), force=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt headers raise struct.error, BytesLengthException, ...
        raise ImageReadError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e}).") from e
    try:
        _ensure_transfer_syntax(ds)
        return _decode_dicom(ds, name, policy, frame, max_pixels)
    except (ImageReadError, InvalidImageError):
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt element can fail anywhere in pydicom
        raise ImageReadError(f"{name}: corrupt DICOM ({type(e).__name__}: {e}).") from e


def _decode_dicom(ds: Any, name: str, policy: str, frame: int | None, max_pixels: int) -> np.ndarray | TableImage:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"{name}: DICOM file has no pixel data (SOP class "
                             f"{getattr(ds.get('SOPClassUID'), 'name', ds.get('SOPClassUID', 'unknown'))}).")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as e:
        raise ImageReadError(f"{name}: DICOM image lacks valid Rows/Columns/NumberOfFrames ({e}).") from e
    if rows < 1 or cols < 1:
        raise ImageReadError(f"{name}: DICOM image has size {rows}x{cols}.")
    if rows * cols * frames > max_pixels:
        raise ImageReadError(f"{name}: {frames} frame(s) of {rows}x{cols} exceed the {max_pixels}-pixel limit "
                             f"(a guard against decompression bombs; raise max_pixels= if the file is genuine).")
    if frames > 1 and frame is None:
        raise InvalidImageError(f"{name}: multi-frame DICOM with {frames} frames; choose one with frame=0..."
                                f"{frames - 1} (read_image(..., frame=k)).")
    if frame is not None and not 0 <= frame < frames:
        raise InvalidImageError(f"{name}: frame {frame} requested but the file has {frames} frame(s).")
    _dicom_decoder_check(ds, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    # Uncompressed grey pixels: a read-only view of the file's buffer, and the unused high bits cleared here only
    # when some pixel has them set; pydicom's defaults copy the pixel data and shift every pixel twice.
    as_view = photometric in ("MONOCHROME1", "MONOCHROME2") and "PixelData" in ds and \
        int(ds.get("BitsAllocated", 0) or 0) in (8, 16, 32) and \
        not ds.file_meta.TransferSyntaxUID.is_compressed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about fixable header quirks; the result is checked below
            if as_view:
                ds.pixel_array_options(view_only=True, correct_unused_bits=False)
            arr = ds.pixel_array
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom and its plugins raise many types for corrupt data
        raise ImageReadError(f"{name}: cannot decode the DICOM pixel data ({type(e).__name__}: {e}).") from e
    if frames > 1:
        arr = arr[frame]
    if as_view:
        arr = _clear_unused_bits(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) or photometric in ("RGB", "PALETTE COLOR") or \
            photometric.startswith("YBR"):
        return _dicom_colour(ds, arr, photometric, name)
    if arr.ndim != 2:
        raise ImageReadError(f"{name}: unexpected pixel array shape {arr.shape} for {photometric}.")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{name}: photometric interpretation {photometric!r} is not supported.")
    pad = _padding_mask(ds, arr)
    valid = None if pad is None else ~pad
    if valid is not None and not valid.any():
        raise ImageReadError(f"{name}: every pixel is padding (PixelPaddingValue).")
    lut = _lut_index(arr)
    if lut is not None:  # the policy is computed on a table over the stored values, then one gather (see above)
        index, domain = lut
        values = np.asarray(apply_modality_lut(domain, ds), dtype=np.float64)
        lo, hi, stored_lo, stored_hi = _table_extremes(arr, index, values, valid)
    else:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        lo, hi = _extremes(values, valid) if np.isfinite(values).all() else (np.nan, np.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageReadError(f"{name}: pixel values are not finite.")

    invert = photometric == "MONOCHROME1"

    def per_pixel(table: np.ndarray, equalize: bool = False) -> np.ndarray | TableImage:
        if lut is not None:
            unsigned = pad is None and arr.dtype.kind == "u"  # the stored values are the table indices
            linear = _affine(table, stored_lo, stored_hi) if unsigned and table.dtype == np.float32 else None
            # 16-bit stored values (8-bit ones take OpenCV's LUT, as fast)
            fast = _scale_abs(table, values, lo, hi, invert, stored_lo, stored_hi) \
                if unsigned and table.dtype == np.uint8 and index.dtype == np.uint16 else None
            return TableImage(index, table, equalize, pad, linear, fast)
        return _finish(table, equalize, pad)

    if policy == "mimic-cxr-jpg":
        u8 = _to_unit_8bit(values, lo, hi)
        return per_pixel(255 - u8 if invert else u8, equalize=True)
    elif policy == "minmax":
        out = _minmax(values, lo, hi)
    elif policy == "voi":
        if "VOILUTSequence" not in ds and "WindowCenter" not in ds:
            raise InvalidImageError(f"{name}: policy 'voi' needs a VOI LUT or WindowCenter/WindowWidth, and the "
                                    f"file has neither; use policy 'minmax' or 'bits'.")
        b_lo, b_hi = _bits_range(ds)
        ends = np.asarray(apply_modality_lut(np.array([b_lo, b_hi]).astype(arr.dtype), ds), dtype=np.float64)
        y = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        y_ends = np.asarray(apply_voi_lut(ends, ds), dtype=np.float64)
        y_lo, y_hi = float(y_ends.min()), float(y_ends.max())
        out = np.zeros(values.shape, np.float32) if y_hi <= y_lo else \
            np.clip((y - y_lo) / (y_hi - y_lo), 0, 1).astype(np.float32)
    else:  # "bits"
        b_lo, b_hi = _bits_range(ds)
        ends = np.asarray(apply_modality_lut(np.array([b_lo, b_hi]).astype(arr.dtype), ds), dtype=np.float64)
        e_lo, e_hi = float(ends.min()), float(ends.max())
        out = np.clip((values - e_lo) / (e_hi - e_lo), 0, 1).astype(np.float32) if e_hi > e_lo else \
            np.zeros(values.shape, np.float32)
    return per_pixel(1.0 - out if invert else out)  # padding, if any, ends black


def _clear_unused_bits(arr: np.ndarray, ds: Any) -> np.ndarray:
    """pydicom's ``correct_unused_bits``: bits above BitsStored shifted out (sign-extending signed pixels), on a copy
    and only when some pixel has them set (then the view of the file's buffer stays as it is); native byte order."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return arr
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    shift = allocated - stored
    if stored < 1 or shift <= 0:
        return arr
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if arr.dtype.kind == "i" else (0, (1 << stored) - 1)
    stored_lo, stored_hi = _stored_range(arr)
    if lo <= stored_lo and stored_hi <= hi:
        return arr
    out = arr.copy()
    np.left_shift(out, shift, out=out)
    np.right_shift(out, shift, out=out)
    return out


def _dicom_colour(ds: Any, arr: np.ndarray, photometric: str, name: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
        # pydicom 3 returns RGB for YBR data by default; convert if a plugin handed back YBR unchanged.
        if photometric.startswith("YBR") and getattr(ds, "_pixel_array_opts", {}).get("as_rgb") is False:
            arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ImageReadError(f"{name}: unexpected colour pixel array shape {arr.shape}.")
    if bits == 8 and arr.dtype == np.uint8:
        return np.ascontiguousarray(arr[..., :3])
    return np.clip(arr[..., :3].astype(np.float32) / float(2**bits - 1), 0, 1)


# --------------------------------------------------------------------------------------------------------------------
# PNG, JPEG, TIFF (Pillow)


def _read_pil(name: str, data: bytes, policy: str, frame: int | None, max_pixels: int) -> np.ndarray | TableImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if w * h > max_pixels:
                raise ImageReadError(f"{name}: {w}x{h} pixels exceed the {max_pixels}-pixel limit (a guard against "
                                     f"decompression bombs; raise max_pixels= if the file is genuine).")
            if n_frames > 1 and frame is None:
                raise InvalidImageError(f"{name}: {n_frames} frames/pages; choose one with frame=k.")
            if frame is not None:
                if not 0 <= frame < n_frames:
                    raise InvalidImageError(f"{name}: frame {frame} requested but there are {n_frames}.")
                im.seek(frame)
                w, h = im.size  # pages can differ in size: check the one that is decoded
                if w * h > max_pixels:
                    raise ImageReadError(f"{name}: page {frame} has {w}x{h} pixels, over the {max_pixels}-pixel "
                                         f"limit (a guard against decompression bombs).")
            im.load()
            im = ImageOps.exif_transpose(im)
    except (ImageReadError, InvalidImageError):
        raise
    except UnidentifiedImageError as e:
        raise ImageReadError(f"{name}: not an image Pillow or pydicom can read (DICOM files need the DICM preamble "
                             f"or a .dcm name).") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{name}: too large for the pixel limit, refused as a possible decompression bomb "
                             f"({e}).") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(f"{name}: cannot decode ({e}); the file may be truncated or corrupt.") from e
    if w < 1 or h < 1:
        raise ImageReadError(f"{name}: image has size {w}x{h}.")
    mode = im.mode
    if mode in ("1", "L", "P", "LA", "La", "PA"):
        im = im.convert("RGB") if mode in ("P", "PA") and "transparency" not in im.info and \
            _palette_is_colour(im) else im.convert("L")
        return np.asarray(im, dtype=np.uint8)
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode.startswith("I;16"):
        return _deep_grey(np.asarray(im).astype(np.uint16), policy, scale=65535.0)  # native byte order
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        return _deep_grey(arr, policy, scale=None if arr.min() < 0 or arr.max() > 65535 else 65535.0)
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{name}: float image contains NaN or infinite values.")
        in_unit = arr.min() >= 0 and arr.max() <= 1
        return _deep_grey(arr, policy, scale=1.0 if in_unit else None)
    raise ImageReadError(f"{name}: image mode {mode!r} is not supported.")


def _palette_is_colour(im: Any) -> bool:
    rgb = np.asarray(im.convert("RGB"))
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def apply_policy_to_grey(arr: np.ndarray, policy: str) -> np.ndarray:
    """An in-memory grey image with more than 8 bits (uint16 array, PIL ``I;16``) under an intensity policy, as if
    it had been read from a 16-bit PNG: uint8 for ``mimic-cxr-jpg``, float32 in [0, 1] otherwise."""
    _check_policy(policy)
    arr = np.asarray(arr)
    return _resolve(_deep_grey(arr if arr.dtype == np.uint16 else arr.astype(np.float64), policy, scale=65535.0))


def _deep_grey(arr: np.ndarray, policy: str, scale: float | None) -> np.ndarray | TableImage:
    """A grey image with more than 8 bits and no DICOM header, under an intensity policy (uint16 through a table)."""
    lut = _lut_index(arr) if arr.dtype == np.uint16 else None
    values = lut[1].astype(np.float64) if lut is not None else arr
    lo, hi = (float(arr.min()), float(arr.max())) if policy in ("mimic-cxr-jpg", "minmax") or scale is None \
        else (0.0, 0.0)
    if policy == "mimic-cxr-jpg":
        table = _to_unit_8bit(values, lo, hi)
    elif policy == "minmax" or scale is None:
        table = _minmax(values, lo, hi)
    else:
        table = np.clip(values / scale, 0, 1).astype(np.float32)
    if lut is not None:
        occurring = (int(lo), int(hi)) if policy == "minmax" else (0, table.size - 1)
        if policy == "mimic-cxr-jpg":
            return TableImage(lut[0], table, equalize=True,
                              scale_abs=_scale_abs(table, values, lo, hi, False, int(lo), int(hi)))
        return TableImage(lut[0], table, affine=_affine(table, *occurring))
    return _finish(table, policy == "mimic-cxr-jpg", None)


# --------------------------------------------------------------------------------------------------------------------


def read_image(src: ImageSource, *, policy: str = "bits", frame: int | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Read a DICOM, PNG, JPEG or TIFF image as float32 in [0, 1]: ``[H, W]`` (grey) or ``[H, W, 3]`` (colour).

    Args:
        src: a path, bytes, or a binary file object.
        policy: intensity policy for DICOM and >8-bit images, one of :data:`POLICIES` (see the module doc).
        frame: which frame of a multi-frame DICOM or multi-page TIFF; required when there are several.
        max_pixels: refuse larger images (decompression-bomb guard); default ``ECAMP_MAX_IMAGE_PIXELS`` or 2**27.

    Raises :class:`~ecamp.errors.ImageReadError` (or :class:`~ecamp.errors.MissingDecoderError`) naming the file
    and the reason; never returns a partial image.
    """
    out = read_image_native(src, policy=policy, frame=frame, max_pixels=max_pixels)
    return out.astype(np.float32) / 255.0 if out.dtype == np.uint8 else out


def read_image_native(src: ImageSource, *, policy: str = "bits", frame: int | None = None,
                      max_pixels: int | None = None) -> np.ndarray:
    """As :func:`read_image`, but 8-bit results stay ``uint8`` (0-255), so the transforms can take the exact
    8-bit path the authors' torchvision pipeline took; everything else is float32 in [0, 1]."""
    return _resolve(decode_image(src, policy=policy, frame=frame, max_pixels=max_pixels))


def decode_image(src: ImageSource, *, policy: str = "bits", frame: int | None = None,
                 max_pixels: int | None = None) -> np.ndarray | TableImage:
    """As :func:`read_image_native`, but a grey image whose policy is a table over its stored values (8/16-bit
    DICOM and 16-bit PNG/TIFF) comes back as a :class:`TableImage`, its per-pixel steps not yet run, so that they
    can run elsewhere (on the GPU); its ``apply()`` is :func:`read_image_native`'s result."""
    _check_policy(policy)
    name, data = _open(src)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    try:
        if isinstance(data, _DicomFile) or is_dicom(data, name):
            with warnings.catch_warnings():
                # pydicom warns about header values it can read past (e.g. malformed IS strings); the reader
                # validates what it uses and raises ImageReadError where it matters.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
                return _read_dicom(name, data, policy, frame, limit)
        return _read_pil(name, data, policy, frame, limit)
    except InvalidImageError as e:  # (ImageReadError too) the decoders know the display name; the file goes here
        if e.path is None:
            e.path = _source_path(src)
        raise
