"""The one reader of data-set lists: CSV tables with required columns, and the authors' space-separated label lists.

Errors name the file (``.path``), the line and what would fit; an empty list is an error unless allowed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecamp.errors import DataError, EcampError

__all__ = ["LAYOUT_HINT", "read_table", "read_label_list"]

LAYOUT_HINT = ("the pre-training layout is described in the README, and `ecamp train phantom` writes an "
               "example")


def read_table(path: str | Path, required: Sequence[str], *, missing_hint: str = "",
               error: type[EcampError] = DataError, strip: bool = False, allow_empty: bool = False
               ) -> list[dict[str, str]]:
    """The rows of a CSV file with a header holding ``required`` columns (``strip``: trim names and values)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist{'; ' + missing_hint if missing_hint else '.'}", path=path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=strip)
        names = [c.strip() for c in reader.fieldnames or []] if strip else list(reader.fieldnames or [])
        missing = [c for c in required if c not in names]
        if missing:
            raise error(f"{path} lacks column(s) {missing}; it has {reader.fieldnames}.", path=path)
        rows = list(reader)
    if strip:
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    if not rows and not allow_empty:
        raise error(f"{path} has no rows.", path=path)
    return rows


def read_label_list(path: str | Path, num_classes: int, multilabel: bool, *, missing_hint: str = ""
                    ) -> list[tuple[str, np.ndarray]]:
    """The authors' ``<image> <label> ...`` lists: (relative path, float labels [C], or a class index [1] for
    single-label tasks, one-hot rows accepted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"List file {path} does not exist{'; ' + missing_hint if missing_hint else '.'}", path=path)
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        name, labels = parts[0], parts[1:]
        try:
            values = np.array([float(v) for v in labels], dtype=np.float32)
        except ValueError as e:
            raise DataError(f"{path}:{k}: labels must be numbers: {line!r}", path=path) from e
        if multilabel:
            if len(values) != num_classes:
                raise DataError(f"{path}:{k}: expected {num_classes} labels, got {len(values)}: {line!r}", path=path)
        elif len(values) == num_classes and num_classes > 1:
            values = np.array([float(np.argmax(values))], dtype=np.float32)
        elif len(values) != 1 or not 0 <= values[0] < num_classes:
            raise DataError(f"{path}:{k}: expected a class index in 0..{num_classes - 1} or {num_classes} one-hot "
                            f"labels: {line!r}", path=path)
        rows.append((name, values))
    if not rows:
        raise DataError(f"List file {path} is empty.", path=path)
    return rows
