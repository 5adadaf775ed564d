"""The four intensity policies (:data:`~ecamp.config.POLICIES`), in one place for DICOM and header-less images.

:func:`_apply_policy` is the only dispatch on the policy: the DICOM reader and the reader of deep grey images
without a header (16-bit PNG/TIFF, in-memory arrays) differ only in what they hand it (the values, their range over
the image, the range their storage allows, a VOI transform, whether to invert), so a policy means the same for both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import POLICIES
from ..errors import InvalidImageError
from .tables import TableImage, _finish, _lut_index, _table_image, as_array

__all__ = ["apply_policy_to_grey"]


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise InvalidImageError(f"Unknown intensity policy {policy!r}; use one of {POLICIES}.")


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


def _apply_policy(values: np.ndarray, policy: str, lo: float, hi: float, *, invert: bool = False,
                  ends: Callable[[], np.ndarray] | None = None,
                  window: Callable[[np.ndarray], np.ndarray] | None = None,
                  index: np.ndarray | None = None, pad: np.ndarray | None = None,
                  linear_span: tuple[int, int] | None = None, stored_span: tuple[int, int] | None = None
                  ) -> np.ndarray | TableImage:
    """``values`` (float64 intensities: the pixels, or a table over the stored values when ``index`` is given)
    under ``policy``, MONOCHROME1 ``invert``-ed, ``pad`` pixels black.

    ``lo``, ``hi``: the values' extremes over the image's (non-padding) pixels (``minmax``, ``mimic-cxr-jpg``).
    ``ends()``: the values of the lowest and highest value the storage allows (``bits``; ``voi`` scales by their
    windowed values); without it nothing bounds the values but the image, and ``bits`` and ``voi`` are min-max.
    ``window``: the file's VOI transform; without one ``voi`` is ``bits``. With ``index`` the result is a
    :class:`TableImage` (``linear_span``, ``stored_span``: as :func:`~ecamp.io.tables._table_image`).
    """
    equalize = False
    if policy == "mimic-cxr-jpg":
        u8 = _to_unit_8bit(values, lo, hi)
        table, equalize = (255 - u8 if invert else u8), True
    else:
        if policy == "minmax" or ends is None:
            out = _minmax(values, lo, hi)
        elif policy == "voi" and window is not None:
            e = ends()
            y, y_ends = window(values), window(e)
            y_lo, y_hi = float(y_ends.min()), float(y_ends.max())
            out = np.zeros(values.shape, np.float32) if y_hi <= y_lo else \
                np.clip((y - y_lo) / (y_hi - y_lo), 0, 1).astype(np.float32)
        else:  # "bits"
            e = ends()
            e_lo, e_hi = float(e.min()), float(e.max())
            out = np.clip((values - e_lo) / (e_hi - e_lo), 0, 1).astype(np.float32) if e_hi > e_lo else \
                np.zeros(values.shape, np.float32)
        table = 1.0 - out if invert else out  # padding, if any, ends black
    if index is None:
        return _finish(table, equalize, pad)
    return _table_image(index, table, values, lo, hi, equalize=equalize, pad=pad, invert=invert,
                        linear_span=linear_span, stored_span=stored_span)


def _deep_grey(arr: np.ndarray, policy: str, scale: float | None) -> np.ndarray | TableImage:
    """A grey image with more than 8 bits and no DICOM header, under an intensity policy (uint16 through a table).
    ``scale``: the largest value its storage holds (0 the smallest); ``None`` when unknown (min-max then)."""
    lut = _lut_index(arr) if arr.dtype == np.uint16 else None
    values = lut[1].astype(np.float64) if lut is not None else arr
    lo, hi = (float(arr.min()), float(arr.max())) if policy in ("mimic-cxr-jpg", "minmax") or scale is None \
        else (0.0, 0.0)
    ends = None if scale is None else (lambda: np.array([0.0, scale]))
    if lut is None:
        return _apply_policy(values, policy, lo, hi, ends=ends)
    # the stored values are the indices; a linear fit over the whole table unless only the image's range counts
    occurring = (int(lo), int(hi))
    return _apply_policy(values, policy, lo, hi, ends=ends, index=lut[0],
                         linear_span=occurring if policy == "minmax" else (0, values.size - 1),
                         stored_span=occurring)


def apply_policy_to_grey(arr: np.ndarray, policy: str) -> np.ndarray:
    """An in-memory grey image with more than 8 bits (uint16 array, PIL ``I;16``) under an intensity policy, as if
    it had been read from a 16-bit PNG: uint8 for ``mimic-cxr-jpg``, float32 in [0, 1] otherwise."""
    _check_policy(policy)
    arr = np.asarray(arr)
    return as_array(_deep_grey(arr if arr.dtype == np.uint16 else arr.astype(np.float64), policy, scale=65535.0))
