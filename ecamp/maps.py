"""Maps on a film's own pixel grid and their pictures: what :mod:`ecamp.explain` and :mod:`ecamp.grounding` share.

A map computed on the model's input (the film resized and centre-cropped by its transform) is carried back to the
film's pixels (:func:`film_to_input`, :func:`to_film`); :func:`overlay` draws it over the film, :func:`save_figure`
writes the picture atomically. Pictures need the ``plot`` extra: ``pip install "ecamp[plot]"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MissingDependencyError

__all__ = ["grey_film", "film_to_input", "to_film", "minmax", "figure_class", "new_figure", "overlay", "save_figure",
           "PLOT_EXTRA"]

PLOT_EXTRA = 'pip install "ecamp[plot]"'


def grey_film(view: Any) -> np.ndarray:
    """The converted image (PIL ``L``/``RGB``/``F`` or a float ``[3, H, W]`` tensor) as grey float32 in [0, 1]."""
    from PIL import Image

    if isinstance(view, Image.Image):
        if view.mode == "F":
            return np.asarray(view, dtype=np.float32)
        return np.asarray(view.convert("L"), dtype=np.float32) / 255.0
    from .transforms import LUMA

    return (view * torch.tensor(LUMA).view(3, 1, 1)).sum(0).numpy().astype(np.float32)


def film_to_input(tf: Any, view: Any, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(sy, oy, sx, ox)``: film coordinate ``y`` (pixel edges at integers) lands at ``sy * y + oy`` of the model
    input, ``x`` at ``sx * x + ox``.

    The resize and crop are torchvision's own: a 1-pixel box at the centre of the canvas is sent through the
    transform's geometry steps (torchvision moves boxes exactly as it moves pixels), so the map follows whatever the
    transform does, rounding of the resized size and crop offset included. The box stays inside any centre crop.
    """
    from torchvision import tv_tensors

    h, w = shape
    dy = dx = 0.0
    if tf.fov_crop:  # fundus: the crop to the field of view and the centring pad of ecamp.fundus.fov_crop
        from .fundus import fov_bbox

        box = fov_bbox(np.asarray(view) if not isinstance(view, torch.Tensor) else view.permute(1, 2, 0).numpy())
        if box is not None:
            top, bottom, left, right = box
            side = max(bottom - top, right - left)
            dy, dx = (side - (bottom - top)) // 2 - top, (side - (right - left)) // 2 - left
            h = w = side
    probe = tv_tensors.BoundingBoxes(torch.tensor([[w / 2 - 0.5, h / 2 - 0.5, w / 2 + 0.5, h / 2 + 0.5]],
                                                  dtype=torch.float64), format="XYXY", canvas_size=(h, w))
    x0, y0, x1, y1 = tf.geometry(probe)[0].tolist()
    sx, sy = x1 - x0, y1 - y0
    oy, ox = y0 - sy * (h / 2 - 0.5), x0 - sx * (w / 2 - 0.5)
    return sy, oy + sy * dy, sx, ox + sx * dx


def to_film(grid: torch.Tensor, in_size: tuple[int, int], affine: tuple[float, float, float, float],
             shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A map covering the model input (any resolution: the token grid or the input's pixels) resampled bilinearly
    at the centre of every film pixel, and where the film was inside the input; outside (cropped away) it is 0."""
    import torch.nn.functional as F

    sy, oy, sx, ox = affine
    (in_h, in_w), (h, w) = in_size, shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * sy + oy
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * sx + ox
    gy, gx = torch.meshgrid(2 * ys / in_h - 1, 2 * xs / in_w - 1, indexing="ij")
    sample = torch.stack([gx, gy], -1)[None].float()
    out = F.grid_sample(grid.detach().float().cpu()[None, None], sample, mode="bilinear", padding_mode="border",
                        align_corners=False)[0, 0]
    inside = ((ys >= 0) & (ys <= in_h))[:, None] & ((xs >= 0) & (xs <= in_w))[None, :]
    return (out * inside).clamp(0, 1).numpy().astype(np.float32), inside.numpy()


def minmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(f"Plotting needs matplotlib: {PLOT_EXTRA}.") from e
    return Figure


def new_figure(**kw: Any):
    """A matplotlib ``Figure`` with constrained layout (``kw``: figsize, dpi, ...), made without pyplot, so nothing
    global is left behind in long runs or DataLoader workers; the ``plot`` extra is named when matplotlib is
    missing. The figures of ``ecamp explain``, the demo's report and the SR-window maps are all made here."""
    return figure_class()(layout="constrained", **kw)


def overlay(film: np.ndarray, heat: np.ndarray, *, ax: Any = None, title: str | None = None, alpha: float = 0.45,
            cmap: str = "jet", colorbar: str | None = "relevance"):
    """Draw ``heat`` over the grey ``film`` (both ``[H, W]`` in [0, 1]; masked pixels of a ``numpy.ma`` heat map
    stay uncoloured) on a matplotlib ``ax`` (default: a new figure's). ``colorbar`` is its label, None for none.
    Returns the heat map's image (for a shared colorbar)."""
    if ax is None:
        ax = new_figure().subplots()
    ax.imshow(film, cmap="gray", vmin=0, vmax=1)
    im = ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=alpha)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    if title:
        ax.set_title(title, fontsize="medium")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label=colorbar)
    return im


def save_figure(fig: Any, out: str | os.PathLike, **savefig: Any) -> Path:
    """Write a matplotlib figure as PNG, atomically (``savefig``: extra ``Figure.savefig`` arguments; 120 dpi unless
    given)."""
    from .fileio import atomic_write

    out = Path(out)
    savefig.setdefault("dpi", 120)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", **savefig))
    return out
