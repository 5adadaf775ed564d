"""Where an image comes from: a path, bytes or a binary file object, opened once and told DICOM or not."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Union

from ..errors import ImageReadError, InvalidImageError

__all__ = ["ImageSource", "DICOM_SUFFIXES", "is_dicom", "source_path"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM Part 10 preamble, or a DICOM file extension (for files written without the preamble)."""
    return data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES)


def source_path(src: Any) -> str | None:
    """The file an image source is: a path, or a file object's ``name``; ``None`` for bytes and anonymous streams."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return None
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else None


def _describe(src: Any) -> str:
    """The name errors give an image source."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


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
            raise ImageReadError(f"{name}: file object must be opened in binary mode.", path=source_path(src))
    else:
        raise InvalidImageError(f"Cannot read an image from a {type(src).__name__}; pass a path, bytes or a binary "
                                f"file object.")
    if not data:
        raise ImageReadError(f"{name}: empty file.", path=source_path(src))
    return name, data
