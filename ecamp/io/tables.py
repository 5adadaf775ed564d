"""The fast path of the intensity policies: a look-up table over the stored values, mapped in one pass.

Integer pixels of at most 16 bits go through a table over every value their dtype can hold: the policy is computed
once per possible value with the same float64 expressions as per pixel (so the result is bit-identical), and one
gather maps the image. On a 2k x 2k film this replaces several full-size float64 passes. OpenCV, when installed,
does the gather, the 16-to-8-bit linear map and the min/max exactly and faster; without it numpy and torch give the
same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidImageError

__all__ = ["TableImage", "as_array", "equalize_hist", "equalize_lut"]


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


_CV2: Any = None  # the cv2 module, False when it is not installed (or switched off), None until first asked
_LUT_INDEX = {np.dtype(np.uint8): np.uint8, np.dtype(np.int8): np.uint8, np.dtype(np.uint16): np.uint16,
              np.dtype(np.int16): np.uint16}
_MINMAX_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.int32))


def _lut_index(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(index, domain)``: ``arr`` viewed as unsigned table indices and the stored value each index stands for;
    ``None`` for dtypes the table does not cover (32-bit, float)."""
    unsigned = _LUT_INDEX.get(arr.dtype)
    if unsigned is None:
        return None
    return arr.view(unsigned), np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)


def _as_2d(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1, arr.shape[-1]) if arr.ndim >= 2 else arr.reshape(1, -1)


def _stored_range(arr: np.ndarray) -> tuple[int, int]:
    """Lowest and highest stored integer value: OpenCV's ``minMaxLoc`` (one pass) for the 2-D dtypes it takes, else
    numpy's ``min`` and ``max``."""
    cv2 = _opencv() if arr.ndim == 2 and arr.size and arr.dtype in _MINMAX_DTYPES else None
    if cv2 is not None:
        lo, hi, _, _ = cv2.minMaxLoc(arr)
        return int(lo), int(hi)
    return int(arr.min()), int(arr.max())


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


def _finish(out: np.ndarray, equalize: bool, pad: np.ndarray | None) -> np.ndarray:
    """The steps of a policy after the per-pixel mapping: equalisation (8-bit), padding to black."""
    if equalize:
        out = equalize_hist(out, None if pad is None else ~pad)
    if pad is not None:
        out[pad] = 0
    return out


@dataclass(frozen=True, eq=False)
class TableImage:
    """A grey image whose intensity policy is a table over its stored values, decoded but not yet mapped.

    :meth:`apply` gives what :func:`~ecamp.io.read_image_native` returns: ``table[index]``, then, when ``equalize``
    (the ``mimic-cxr-jpg`` policy), histogram equalisation over the pixels outside ``pad``, then ``pad`` pixels set
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


def as_array(decoded: np.ndarray | TableImage) -> np.ndarray:
    """The image a :func:`~ecamp.io.decode_image` result stands for: a :class:`TableImage` applied, an array as is."""
    return decoded.apply() if isinstance(decoded, TableImage) else decoded


def _table_image(index: np.ndarray, table: np.ndarray, values: np.ndarray, lo: float, hi: float, *, equalize: bool,
                 pad: np.ndarray | None, invert: bool, linear_span: tuple[int, int] | None,
                 stored_span: tuple[int, int] | None) -> TableImage:
    """A :class:`TableImage` with the shortcuts its table allows: ``affine`` fitted over ``linear_span`` (float
    tables), ``scale_abs`` checked over ``stored_span`` (8-bit tables over 16-bit indices; 8-bit indices take
    OpenCV's LUT, as fast). ``values``, ``lo``, ``hi``, ``invert``: what the 8-bit table was made from."""
    linear = _affine(table, *linear_span) if linear_span is not None and table.dtype == np.float32 else None
    fast = _scale_abs(table, values, lo, hi, invert, *stored_span) \
        if stored_span is not None and table.dtype == np.uint8 and index.dtype == np.uint16 else None
    return TableImage(index, table, equalize, pad, linear, fast)
