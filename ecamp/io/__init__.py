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

import os
import warnings
from typing import Any

import numpy as np

from ..config import POLICIES
from ..errors import InvalidImageError
from .dicom import _read_dicom
from .pil import _read_pil
from .policies import _check_policy, apply_policy_to_grey
from .source import DICOM_SUFFIXES, ImageSource, _DicomFile, _open, is_dicom, source_path
from .tables import TableImage, as_array, equalize_hist, equalize_lut

__all__ = ["read_image", "read_image_native", "decode_image", "TableImage", "POLICIES", "DEFAULT_MAX_PIXELS",
           "DICOM_SUFFIXES", "ImageSource", "equalize_hist", "equalize_lut", "is_dicom", "apply_policy_to_grey",
           "as_array", "source_path"]

# Guard against decompression bombs: about 11585 x 11585 pixels, 7x the largest radiographs in common use.
DEFAULT_MAX_PIXELS = int(os.environ.get("ECAMP_MAX_IMAGE_PIXELS", 2**27))


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
    return as_array(decode_image(src, policy=policy, frame=frame, max_pixels=max_pixels))


def decode_image(src: ImageSource, *, policy: str = "bits", frame: int | None = None,
                 max_pixels: int | None = None, pil: bool = False) -> np.ndarray | TableImage | Any:
    """As :func:`read_image_native`, but a grey image whose policy is a table over its stored values (8/16-bit
    DICOM and 16-bit PNG/TIFF) comes back as a :class:`TableImage`, its per-pixel steps not yet run, so that they
    can run elsewhere (on the GPU); its ``apply()`` is :func:`read_image_native`'s result. ``pil``: an 8-bit file
    other than DICOM comes back as the Pillow ``L`` or ``RGB`` image of those pixels, without the array copy (for
    a caller that goes on in Pillow, as the eval transform's resize does)."""
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
        return _read_pil(name, data, policy, frame, limit, pil=pil)
    except InvalidImageError as e:  # (ImageReadError too) the decoders know the display name; the file goes here
        if e.path is None:
            e.path = source_path(src)
        raise
