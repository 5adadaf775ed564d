"""DICOM through pydicom: the file's header checked, one frame's stored pixels, then colour or a grey policy.

Grey pixels go through the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) and an intensity policy
(:mod:`ecamp.io.policies`); 8/16-bit stored values through a table over every value they can hold
(:mod:`ecamp.io.tables`), so a decoded film is mapped once, on the CPU or later on a device.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from ..errors import ImageReadError, InvalidImageError, MissingDecoderError
from .policies import _apply_policy
from .source import _DicomFile
from .tables import TableImage, _lut_index, _stored_range, _table_extremes

__all__: list[str] = []


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
    frames = _frame_count(ds, name, frame, max_pixels)
    arr, photometric = _stored_pixels(ds, name, frame, frames)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) or photometric in ("RGB", "PALETTE COLOR") or \
            photometric.startswith("YBR"):
        return _dicom_colour(ds, arr, photometric, name)
    return _dicom_grey(ds, arr, photometric, name, policy)


def _frame_count(ds: Any, name: str, frame: int | None, max_pixels: int) -> int:
    """The number of frames, once the header says there are pixels, of a size within ``max_pixels``, and ``frame``
    names one of them (or there is only one)."""
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
    return frames


def _stored_pixels(ds: Any, name: str, frame: int | None, frames: int) -> tuple[np.ndarray, str]:
    """The stored pixels of the chosen frame and the photometric interpretation."""
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
    return arr, photometric


def _dicom_grey(ds: Any, arr: np.ndarray, photometric: str, name: str, policy: str) -> np.ndarray | TableImage:
    """A grey frame's modality values (a table over the stored values for 8/16-bit pixels), their range over the
    non-padding pixels, and the policy on them."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if arr.ndim != 2:
        raise ImageReadError(f"{name}: unexpected pixel array shape {arr.shape} for {photometric}.")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{name}: photometric interpretation {photometric!r} is not supported.")
    pad = _padding_mask(ds, arr)
    valid = None if pad is None else ~pad
    if valid is not None and not valid.any():
        raise ImageReadError(f"{name}: every pixel is padding (PixelPaddingValue).")
    lut = _lut_index(arr)
    span = None
    if lut is not None:  # the policy is computed on a table over the stored values, then one gather
        index, domain = lut
        values = np.asarray(apply_modality_lut(domain, ds), dtype=np.float64)
        lo, hi, stored_lo, stored_hi = _table_extremes(arr, index, values, valid)
        if pad is None and arr.dtype.kind == "u":  # the stored values are the table indices
            span = (stored_lo, stored_hi)
    else:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        lo, hi = _extremes(values, valid) if np.isfinite(values).all() else (np.nan, np.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageReadError(f"{name}: pixel values are not finite.")
    if policy == "voi" and "VOILUTSequence" not in ds and "WindowCenter" not in ds:
        raise InvalidImageError(f"{name}: policy 'voi' needs a VOI LUT or WindowCenter/WindowWidth, and the "
                                f"file has neither; use policy 'minmax' or 'bits'.")

    def ends() -> np.ndarray:  # the modality values of the range BitsStored and PixelRepresentation allow
        b_lo, b_hi = _bits_range(ds)
        return np.asarray(apply_modality_lut(np.array([b_lo, b_hi]).astype(arr.dtype), ds), dtype=np.float64)

    return _apply_policy(values, policy, lo, hi, invert=photometric == "MONOCHROME1", ends=ends,
                         window=lambda v: np.asarray(apply_voi_lut(v, ds), dtype=np.float64),
                         index=None if lut is None else lut[0], pad=pad, linear_span=span, stored_span=span)


def _extremes(values: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    v = values[valid] if valid is not None else values
    return float(v.min()), float(v.max())


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
