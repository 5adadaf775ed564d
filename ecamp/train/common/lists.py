"""The one reader of data-set lists: the authors' list-file names (:func:`list_file_for`), CSV tables with required
columns, and the authors' space-separated label lists, and the one check that every path a list names is a file
(:func:`check_paths`, before any training step).

Errors name the file (``.path``), the line and what would fit; an empty list is an error unless allowed. Where a
list has several bad lines, the first :data:`SHOWN` are shown with the total count, each cut to :data:`WIDTH`
characters with control bytes escaped. A list must be UTF-8 text; a path it names must stay inside the data folder
(no absolute path, no ``..`` above it).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ecamp.errors import DataError, EcampError, InvalidArgumentError

__all__ = ["LAYOUT_HINT", "SHOWN", "WIDTH", "shown", "list_file_for", "read_table", "read_label_list", "list_lines",
           "check_paths", "check_entries", "raise_problems"]

SHOWN = 5  # bad lines shown in one error
WIDTH = 200  # characters of a bad line shown

LAYOUT_HINT = ("the pre-training layout is described in docs/reproducing/pretraining.md, and `ecamp train phantom` "
               "writes an example")


def list_file_for(split: str, fraction: int = 100, suffix: str = ".txt") -> str:
    """The authors' list-file name: ``train_list{,_1,_10}``, ``val_list`` or ``test_list`` plus ``suffix``."""
    if split == "train":
        if fraction not in (1, 10, 100):
            raise InvalidArgumentError(f"--fraction must be 1, 10 or 100, got {fraction}.")
        return ("train_list" if fraction == 100 else f"train_list_{fraction}") + suffix
    if split not in ("val", "test"):
        raise InvalidArgumentError(f"Unknown split {split!r}.")
    return f"{split}_list{suffix}"


def shown(text: str, width: int = WIDTH) -> str:
    """``text`` for a message: control bytes escaped (a NUL or an escape sequence never reaches the terminal) and
    cut to ``width`` characters (a 20 MB line is not echoed)."""
    text = repr(text)[1:-1] if any(not c.isprintable() for c in text[: width * 4]) else text
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} characters)"


def _text(path: Path, error: type[EcampError] = DataError) -> str:
    """A list file's text; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: byte {data[e.start]:#04x} is not UTF-8 text; save the list as UTF-8.",
                    path=path) from None


def read_table(path: str | Path, required: Sequence[str], *, missing_hint: str = "",
               error: type[EcampError] = DataError, strip: bool = False, allow_empty: bool = False
               ) -> list[dict[str, str]]:
    """The rows of a CSV file with a header holding ``required`` columns (``strip``: trim names and values)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist{'; ' + missing_hint if missing_hint else '.'}", path=path)
    reader = csv.DictReader(io.StringIO(_text(path, error), newline=""), skipinitialspace=strip)
    try:
        names = [c.strip() for c in reader.fieldnames or []] if strip else list(reader.fieldnames or [])
        missing = [c for c in required if c not in names]
        if missing:
            raise error(f"{path} lacks column(s) {shown(str(missing))}; it has {shown(str(reader.fieldnames))}.",
                        path=path)
        rows = list(reader)
    except csv.Error as e:  # a field over csv's limit (128 KiB), a NUL in older Pythons
        raise error(f"{path}:{reader.line_num}: not a CSV record ({e}); fix that line.", path=path) from None
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
    rows, problems = [], []
    limit = float(np.finfo(np.float32).max)
    for k, line in enumerate(_text(path).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        name, labels = parts[0], parts[1:]
        try:
            numbers = [float(v) for v in labels]
        except ValueError:
            problems.append(f"{path}:{k}: labels must be numbers: {shown(line)}")
            continue
        if not all(abs(v) <= limit for v in numbers):  # nan, inf and 1e308 (inf in float32) are no label
            problems.append(f"{path}:{k}: labels must be finite numbers: {shown(line)}")
            continue
        values = np.array(numbers, dtype=np.float32)
        if multilabel:
            if len(values) != num_classes:
                problems.append(f"{path}:{k}: expected {num_classes} labels, got {len(values)}: {shown(line)}")
                continue
        elif len(values) == num_classes and num_classes > 1:
            values = np.array([float(np.argmax(values))], dtype=np.float32)
        elif len(values) != 1 or not 0 <= values[0] < num_classes:
            problems.append(f"{path}:{k}: expected a class index in 0..{num_classes - 1} or {num_classes} one-hot "
                            f"labels: {shown(line)}")
            continue
        rows.append((name, values))
    raise_problems(problems, f"List file {path} has {len(problems)} bad line(s)", path)
    if not rows:
        raise DataError(f"List file {path} is empty.", path=path)
    return rows


def raise_problems(problems: Sequence[str], header: str, path: str | Path | None = None) -> None:
    """Raise one :class:`DataError` showing the first :data:`SHOWN` of ``problems`` (if any) and their count."""
    if not problems:
        return
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    lines = "\n  ".join(shown(p, 2 * WIDTH) for p in problems[:SHOWN])
    raise DataError(f"{header}:\n  {lines}{more}\nFix the list(s) or the data folder, then run again.", path=path)


def list_lines(path: str | Path) -> list[int]:
    """The line number of each entry :func:`read_label_list` (``.txt``: non-blank lines) or :func:`read_table`
    (other suffixes: CSV records after the header) returns, in the same order."""
    path = Path(path)
    if path.suffix == ".txt":
        return [k for k, line in enumerate(_text(path).splitlines(), start=1) if line.split()]
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    try:
        next(reader, None)
        return [reader.line_num for row in reader if row]
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a CSV record ({e}); fix that line.", path=path) from None


def _problem(root: Path, name: str) -> str | None:
    parts = Path(os.path.normpath(name)).parts if name else ()
    if not name or "\0" in name or os.path.isabs(name) or (parts and parts[0] == ".."):
        return f"{shown(name)}: is not a path inside the data folder (absolute, above it or empty)"
    p = root / name
    if p.is_file():
        return None
    try:
        exists = p.exists()
    except OSError as e:  # a name too long for the file system, a folder without permission
        return f"{shown(name)}: cannot be read ({e.strerror or e})"
    return f"{shown(name)}: {'is not a regular file' if exists else 'does not exist'} ({shown(str(p))})"


def check_paths(lists: Mapping[str | Path, Sequence[str | Sequence[str]]], root: str | Path) -> None:
    """Every path named by the rows of every list is a regular file under ``root`` (symlinks to files count; a
    path is relative and never climbs above ``root``);
    otherwise one :class:`DataError` with list file, line and path of the first few problems and their count.

    ``lists`` maps each list file to its rows in the order its reader returned them, each row one relative path or
    several (an image and its mask)."""
    entries = []
    for list_file, rows in lists.items():
        lines = [str(k) for k in list_lines(list_file)]
        if len(lines) != len(rows):  # rows not straight from the reader: number the entries instead
            lines = [f" entry {k}" for k in range(1, len(rows) + 1)]
        for line, row in zip(lines, rows, strict=True):
            entries += [(f"{list_file}:{line}", name) for name in ([row] if isinstance(row, str) else row)]
    check_entries(entries, root, next(iter(lists), None))


def check_entries(entries: Sequence[tuple[str, str]], root: str | Path, path: str | Path | None = None) -> None:
    """:func:`check_paths` on ``(where, relative path)`` pairs whose ``where`` (``"file:line"``) the caller
    knows, e.g. the rows of one table split three ways; ``path`` is the error's ``.path``."""
    root = Path(root)
    with ThreadPoolExecutor(16) as pool:  # stat calls: a network file system answers them in parallel
        found = list(pool.map(lambda e: _problem(root, e[1]), entries))
    problems = [f"{where}: {msg}" for (where, _), msg in zip(entries, found, strict=True) if msg]
    raise_problems(problems, f"{len(problems)} path(s) in the lists do not name an image file under {root}", path)
