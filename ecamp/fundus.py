"""Fundus field of view: find the bright disc of a fundus photograph and crop away the black surround.

Fundus cameras record a circular field of view inside a black frame, and the frame's size and offset vary between
cameras. Cropping to the disc and padding it to a square (black) makes images from different cameras comparable.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["fov_bbox", "fov_crop"]

logger = logging.getLogger("ecamp")


def fov_bbox(image: np.ndarray, *, rel_threshold: float = 0.05, min_fraction: float = 0.02
             ) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` (exclusive ends) of the field of view, or None when none is found.

    A pixel belongs to the field of view when its brightest channel exceeds the background (the median of the
    image corners) by ``rel_threshold`` of the image's dynamic range; rows and columns count when more than
    ``min_fraction`` of their pixels do, which ignores isolated noise and text overlays.
    """
    arr = np.asarray(image)
    g = arr.max(axis=2) if arr.ndim == 3 else arr
    g = g.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    h, w = g.shape
    m = max(1, min(h, w) // 20)
    corners = np.concatenate([g[:m, :m].ravel(), g[:m, -m:].ravel(), g[-m:, :m].ravel(), g[-m:, -m:].ravel()])
    bg, top = float(np.median(corners)), float(np.percentile(g, 99))
    if top - bg < 0.05:  # no contrast between surround and disc
        return None
    mask = g > bg + rel_threshold * (top - bg)
    rows = np.flatnonzero(mask.sum(1) > max(2, min_fraction * w))
    cols = np.flatnonzero(mask.sum(0) > max(2, min_fraction * h))
    if rows.size == 0 or cols.size == 0:
        return None
    box = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (box[1] - box[0]) * (box[3] - box[2]) < 0.1 * h * w:
        return None
    return box


def fov_crop(image: np.ndarray) -> np.ndarray:
    """Crop to the field of view and pad to a centred square with black; unchanged (with a log line) if no field
    of view is found. Keeps dtype and channels."""
    arr = np.asarray(image)
    box = fov_bbox(arr)
    if box is None:
        logger.info("fov_crop: no field of view found; image left unchanged")
        return arr
    t, b, left, r = box
    crop = arr[t:b, left:r]
    h, w = crop.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side) + crop.shape[2:], dtype=crop.dtype)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0:y0 + h, x0:x0 + w] = crop
    return out
