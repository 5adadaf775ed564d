"""Super-resolution window offsets: the authors' convention (a 12x12 window on the 14x14 patch grid, top-left
offsets 0..2 in ``label_i, label_j``) and its mapping to other grids. One place for every conversion."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["AUTHORS_GRID", "AUTHORS_WINDOW", "map_window", "to_authors", "window_around"]

AUTHORS_GRID, AUTHORS_WINDOW = 14, 12


def map_window(offset: Sequence[int], grid: int, window: int) -> tuple[int, ...]:
    """An offset in the authors' convention -> the same relative place for ``window`` cells of a ``grid`` grid."""
    span = grid - window
    return tuple(int(round(o * span / (AUTHORS_GRID - AUTHORS_WINDOW))) if span else 0 for o in offset)


def to_authors(offset: Sequence[int], grid: int, window: int) -> tuple[int, ...]:
    """The inverse of :func:`map_window`: an offset on ``grid`` -> the authors' 0..2."""
    span = grid - window
    return tuple(int(round(o * (AUTHORS_GRID - AUTHORS_WINDOW) / span)) if span else 0 for o in offset)


def window_around(y: float, x: float, grid: int, window: int) -> tuple[int, int]:
    """Top-left offset of the window whose centre is nearest to the point (``y``, ``x`` in 0..1 of the image),
    kept inside the grid."""

    def clamp(v: float) -> int:
        return int(min(max(round(v * grid - window / 2), 0), grid - window))

    return clamp(y), clamp(x)
