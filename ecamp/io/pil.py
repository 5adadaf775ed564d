"""PNG, JPEG, TIFF, BMP... through Pillow: 8-bit images as they are, deeper grey ones under an intensity policy.

``decode_image(..., pil=True)`` gives an 8-bit file as the Pillow image its array is made of, for the eval
transform, which resizes it with Pillow anyway: Pillow's array export copies the pixels through ``tobytes`` (3 ms
for a 1955x1841 film, a third of its JPEG decode), and ``Image.fromarray`` would only wrap them back into an image.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from ..errors import ImageReadError, InvalidImageError
from .policies import _deep_grey
from .tables import TableImage

__all__: list[str] = []

_EIGHT_BIT_GREY = ("1", "L", "P", "LA", "La", "PA")
_EIGHT_BIT_COLOUR = ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _read_pil(name: str, data: bytes, policy: str, frame: int | None, max_pixels: int, *, pil: bool = False
              ) -> np.ndarray | TableImage | Any:
    """The decoded file as an array (or a :class:`TableImage`); with ``pil``, an 8-bit one as its Pillow image."""
    im = _open_pil(name, data, frame, max_pixels)
    small = _as_8bit(im)
    if small is None:
        return _deep(name, im, policy)
    return small if pil else np.asarray(small, dtype=np.uint8)


def _open_pil(name: str, data: bytes, frame: int | None, max_pixels: int) -> Any:
    """The decoded Pillow image (the page ``frame``), upright by its EXIF orientation; size limits checked."""
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
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
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
    return im


def _as_8bit(im: Any) -> Any:
    """An 8-bit image as ``L`` (grey, and palettes of greys) or ``RGB``; None for deeper modes."""
    mode = im.mode
    if mode in _EIGHT_BIT_GREY:
        if mode in ("P", "PA") and "transparency" not in im.info and _palette_is_colour(im):
            return im.convert("RGB")
        return im if mode == "L" else im.convert("L")  # convert("L") of an L image is a copy
    if mode in _EIGHT_BIT_COLOUR:
        return im if mode == "RGB" else im.convert("RGB")
    return None


def _deep(name: str, im: Any, policy: str) -> np.ndarray | TableImage:
    """A 16-bit, 32-bit integer or float image under ``policy``."""
    mode = im.mode
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
