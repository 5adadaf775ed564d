"""Your own labelled images as a classification task (``ecamp train finetune --dataset custom``).

Three layouts, read by :func:`read_custom`:

* class folders: ``ROOT/<class>/...`` (each folder one class, images found recursively, DICOM files without a
  suffix included), or ``ROOT/train/<class>/``, ``ROOT/val/<class>/``, ``ROOT/test/<class>/`` for a split of your
  own. Multi-class; the classes are the folder names in sorted order.
* a labels CSV with a header (``--labels FILE``): ``path`` (relative to the data root), an optional ``split``
  (``train``, ``val``, ``test``) and either ``label`` (class names: multi-class) or one 0/1 column per label
  (multi-label), and with ``--group-column`` a column naming each image's patient (or study). Nothing else: an
  unknown column is refused rather than guessed at.
* the authors' list files (``train_list.txt``, ``val_list.txt``, ``test_list.txt`` in ``--lists``) with
  ``--label-names`` naming their columns.

Without a split of their own, the rows are split by a seeded stratified draw (multi-class: by class; multi-label:
by each image's rarest positive label; with a group column, whole groups are drawn, so one patient's films share a
split), and every run writes the rows it used, split and labels, to
``OUTPUT/splits.csv``, which ``--labels OUTPUT/splits.csv`` reads back to repeat it. Everything is checked before
a model is built: unreadable or unknown columns, labels outside {0, 1}, paths outside the data root, classes
without images, a single class, missing files. Each error names the file and line.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecamp.errors import DataError, InvalidArgumentError
from ecamp.train.common.lists import (
    check_entries,
    list_file_for,
    list_lines,
    raise_problems,
    read_label_list,
    read_table,
)
from ecamp.train.downstream.classification import ClassificationTask, Task
from ecamp.train.downstream.protocol import Protocol
from ecamp.train.downstream.recipes import Recipe
from ecamp.train.downstream.task import FinetuneRun, run_finetune

__all__ = ["CUSTOM", "LABEL_TYPES", "SPLIT_FILE", "CustomSpec", "CustomData", "read_custom", "stratified_split",
           "CustomClassificationTask", "write_split_file", "finetune_custom"]

logger = logging.getLogger("ecamp")

CUSTOM = "custom"  # the --dataset name
LABEL_TYPES = ("auto", "multi-label", "multi-class")
SPLIT_FILE = "splits.csv"
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CustomSpec:
    """What the user said about her data: the data root, a labels CSV or the authors' lists folder (neither: class
    folders), label names, the label type and the split fractions (used only when the data has no split)."""

    data_root: Path
    labels_csv: Path | None = None
    lists: Path | None = None
    label_names: tuple[str, ...] = ()
    label_type: str = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    group_column: str | None = None  # a labels CSV column naming each image's patient: a patient in one split only

    def __post_init__(self) -> None:
        if self.label_type not in LABEL_TYPES:
            raise InvalidArgumentError(f"--label-type {self.label_type!r}: use one of {LABEL_TYPES}.")
        for name, v in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1):
                raise InvalidArgumentError(f"{name} must be between 0 and 1 (exclusive), got {v!r}.")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise InvalidArgumentError(f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction} "
                                       f"leave under 10 % of the images to train on.")
        if self.labels_csv is not None and self.lists is not None:
            raise InvalidArgumentError("Pass either --labels (a labels CSV) or --lists (the authors' list files), "
                                       "not both.")
        if self.group_column is not None and (self.labels_csv is None or self.group_column in ("path", "split")):
            raise InvalidArgumentError(f"--group-column {self.group_column!r} names a column of the labels CSV "
                                       f"(--labels) other than path and split, e.g. --group-column patient_id.")


@dataclass
class CustomData:
    """Rows ``(relative path, labels)`` per split (multi-label: 0/1 ``[C]``; multi-class: the class index ``[1]``),
    where each row came from (``file:line`` or the image's folder), and how it was split."""

    layout: str  # "class folders", "split class folders", "labels CSV" or "authors' lists"
    source: Path
    labels: tuple[str, ...]
    multilabel: bool
    rows: dict[str, list[tuple[str, np.ndarray]]]
    where: dict[str, list[str]]
    split: str  # how the split was made, for metrics.json
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        return Task(len(self.labels), self.multilabel, "auroc" if self.multilabel else "accuracy", self.labels)


def _outside(name: str) -> str | None:
    """Why a relative image path leaves the data root (absolute, or climbing out with ``..``), or None."""
    if not name:
        return "the path is empty"
    if os.path.isabs(name) or Path(name).is_absolute() or name.startswith(("/", "\\")):
        return f"{name!r} is an absolute path; paths are relative to the data root"
    norm = os.path.normpath(name)
    if norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        return f"{name!r} climbs out of the data root"
    return None


def _short(value: str, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + f"... ({len(value)} characters)"


# -- class folders ------------------------------------------------------------------------------------------------
def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_folder_rows(root: Path, folder: Path, classes: list[str] | None) -> tuple[list[str], list, list]:
    from ecamp.embedding import find_images

    found = _subdirs(folder)
    if not found:
        raise DataError(f"{folder} has no class folders: put each class's images in a folder of its own "
                        f"({folder}/<class>/...), or pass --labels with a labels CSV.", path=folder)
    names = [p.name for p in found]
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{folder} has class folder(s) {unknown} that {root / 'train'} lacks; every class must "
                            f"have training images.", path=folder)
    rows, where = [], []
    index = {c: i for i, c in enumerate(classes or names)}
    for p in found:
        images = find_images([p])
        if not images:
            raise DataError(f"Class folder {p} holds no image files (DICOM, PNG, JPEG, TIFF, BMP): add its images "
                            f"or remove the folder.", path=p)
        for f in images:
            rows.append((Path(f).relative_to(root).as_posix(), np.array([index[p.name]], dtype=np.float32)))
            where.append(str(p))
    return names, rows, where


def _read_folders(spec: CustomSpec, seed: int) -> CustomData:
    root = spec.data_root
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder.", path=root)
    top = [p.name for p in _subdirs(root)]
    if "train" in top:
        missing = [s for s in ("val", "test") if s not in top]
        if missing:
            raise DataError(f"{root} has train/ but no {' or '.join(m + '/' for m in missing)}: add them (each with "
                            f"the same class folders), or put the class folders directly under {root} and ecamp "
                            f"splits them.", path=root)
        classes, rows, where = _class_folder_rows(root, root / "train", None)
        if len(classes) < 2:
            raise DataError(f"{root / 'train'} has one class folder ({classes[0]}); a classifier needs two or more.",
                            path=root / "train")
        per = {"train": (rows, where)}
        for s in ("val", "test"):
            _, r, w = _class_folder_rows(root, root / s, classes)
            per[s] = (r, w)
        return CustomData("split class folders", root, tuple(classes), False, {s: per[s][0] for s in _SPLITS},
                          {s: per[s][1] for s in _SPLITS}, f"given: {root}/{{train,val,test}}/<class>/")
    classes, rows, where = _class_folder_rows(root, root, None)
    if len(classes) < 2:
        raise DataError(f"{root} has one class folder ({classes[0]}); a classifier needs two or more classes, each "
                        f"in a folder of its own.", path=root)
    return _split(CustomData("class folders", root, tuple(classes), False, {"all": rows}, {"all": where}, ""), spec,
                  seed)


# -- a labels CSV -------------------------------------------------------------------------------------------------
def _binary(value: str) -> float | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return v if v in (0.0, 1.0) else None


def _read_csv(spec: CustomSpec, seed: int) -> CustomData:
    path = spec.labels_csv
    table = read_table(path, ["path"], strip=True)
    lines = list_lines(path)
    group = spec.group_column
    if group is not None and group not in table[0]:
        raise DataError(f"{path} has no column {group!r} (--group-column); its columns: {list(table[0])}.",
                        path=path)
    columns = [c for c in table[0] if c not in ("path", "split", group)]
    has_split = "split" in table[0]
    names = list(spec.label_names)
    problems: list[str] = []
    multiclass = "label" in columns
    if multiclass:
        extra = [c for c in columns if c != "label"]
        if extra:
            raise DataError(f"{path}: unknown column(s) {extra}: a labels CSV holds path, an optional split, and "
                            f"either label (class names) or one 0/1 column per label, not both; remove them.",
                            path=path)
        if spec.label_type == "multi-label":
            raise DataError(f"{path} has a label column (one class per image) but --label-type multi-label was "
                            f"passed; give one 0/1 column per label instead.", path=path)
        values = [r["label"] for r in table]
        for k, v in zip(lines, values, strict=True):
            if not v:
                problems.append(f"{path}:{k}: the label is empty")
            elif names and v not in names:
                problems.append(f"{path}:{k}: label {_short(v)} is not one of --label-names {names}")
        classes = names or sorted({v for v in values if v})
    else:
        if not columns:
            raise DataError(f"{path} has no label column: add label (class names) or one 0/1 column per label.",
                            path=path)
        if names:
            unknown = [c for c in columns if c not in names]
            if unknown:
                raise DataError(f"{path}: unknown column(s) {unknown}: not in --label-names {names}; remove them "
                                f"or add them to --label-names.", path=path)
            missing = [n for n in names if n not in columns]
            if missing:
                raise DataError(f"{path} lacks the label column(s) {missing} named by --label-names.", path=path)
        classes = names or columns
    rows_all: list[tuple[str, np.ndarray]] = []
    where_all: list[str] = []
    splits: list[str] = []
    groups: list[str] = []
    for k, r in zip(lines, table, strict=True):
        at = f"{path}:{k}"
        why = _outside(r["path"])
        if why:
            problems.append(f"{at}: {why}")
            continue
        if group is not None and not r[group]:
            problems.append(f"{at}: the {group} (--group-column) is empty; every image needs its group")
            continue
        if has_split:
            s = _SPLIT_NAMES.get(r["split"].lower())
            if s is None:
                problems.append(f"{at}: split {_short(r['split'])} is not train, val or test")
                continue
            splits.append(s)
        if multiclass:
            if r["label"] not in classes:
                continue
            y = np.array([classes.index(r["label"])], dtype=np.float32)
        else:
            got = [(c, _binary(r[c])) for c in classes]
            bad = [(c, r[c]) for c, v in got if v is None]
            if bad:
                problems.append(f"{at}: column {bad[0][0]!r} is {_short(bad[0][1])}; labels are 0 or 1 (decide "
                                f"blank or uncertain labels before training)")
                continue
            y = np.array([v for _, v in got], dtype=np.float32)
        rows_all.append((r["path"], y))
        where_all.append(at)
        if group is not None:
            groups.append(r[group])
    raise_problems(problems, f"{path} has {len(problems)} bad row(s)", path)
    seen: dict[str, str] = {}
    for (name, _), at in zip(rows_all, where_all, strict=True):
        norm = os.path.normpath(name)
        if norm in seen:
            problems.append(f"{at}: {name!r} is listed again (first at {seen[norm]}); each image once")
        seen.setdefault(norm, at)
    raise_problems(problems, f"{path} lists {len(problems)} image(s) twice", path)
    multilabel = not multiclass
    if multilabel and spec.label_type == "multi-class":  # one-hot columns: one 1 per row
        for (_, y), at in zip(rows_all, where_all, strict=True):
            if y.sum() != 1:
                problems.append(f"{at}: --label-type multi-class needs exactly one 1 per row, got {int(y.sum())}")
        raise_problems(problems, f"{path} has {len(problems)} row(s) that are not one-hot", path)
        rows_all = [(n, np.array([float(np.argmax(y))], dtype=np.float32)) for n, y in rows_all]
        multilabel = False
    _refuse_single_class(rows_all, classes, multilabel, path)
    data = CustomData("labels CSV", path, tuple(classes), multilabel, {"all": rows_all}, {"all": where_all}, "")
    if has_split:
        if group is not None:
            _refuse_groups_across_splits(groups, splits, where_all, group, path)
        data.rows = {s: [r for r, t in zip(rows_all, splits, strict=True) if t == s] for s in _SPLITS}
        data.where = {s: [w for w, t in zip(where_all, splits, strict=True) if t == s] for s in _SPLITS}
        empty = [s for s in _SPLITS if not data.rows[s]]
        if empty:
            raise DataError(f"{path}'s split column gives no {' or '.join(empty)} rows: every split needs images "
                            f"(or drop the split column and ecamp splits them).", path=path)
        data.split = f"given: the split column of {path}"
        return data
    return _split(data, spec, seed, groups if group is not None else None)


def _refuse_groups_across_splits(groups: list[str], splits: list[str], where: list[str], column: str,
                                 path: Path) -> None:
    """A given split that puts one group (patient) in two splits leaks it between training and scoring."""
    first: dict[str, tuple[str, str]] = {}
    problems = []
    for g, s, at in zip(groups, splits, where, strict=True):
        seen = first.setdefault(g, (s, at))
        if seen[0] != s:
            problems.append(f"{at}: {column} {_short(g)} is in {s}, and in {seen[0]} at {seen[1]}")
    raise_problems(problems, f"{path}'s split column puts {len(problems)} image(s) of one {column} in two splits; "
                             f"give each {column} one split (or drop the split column and ecamp splits by "
                             f"{column})", path)


def _refuse_single_class(rows: list, classes: list[str], multilabel: bool, path: Path) -> None:
    if not rows:
        raise DataError(f"{path} has no rows with labels.", path=path)
    y = np.stack([r[1] for r in rows])
    if multilabel:
        bad = [f"{c} ({'no positive' if y[:, i].sum() == 0 else 'no negative'})" for i, c in enumerate(classes)
               if y[:, i].sum() in (0, len(y))]
        if bad:
            raise DataError(f"{path}: label(s) {', '.join(bad)} in every row: a label that never varies cannot be "
                            f"learned or scored; remove its column.", path=path)
    elif len(set(y[:, 0].tolist())) < 2:
        raise DataError(f"{path}: every row has the class {classes[int(y[0, 0])]!r}; a classifier needs two or "
                        f"more classes.", path=path)


# -- the authors' lists -------------------------------------------------------------------------------------------
def _read_lists(spec: CustomSpec, fraction: int) -> CustomData:
    lists = spec.lists
    names = list(spec.label_names)
    if not names:
        raise InvalidArgumentError(f"--lists {lists} with --dataset custom needs --label-names naming the list "
                                   f"files' label columns in order, e.g. --label-names effusion,nodule.")
    files = {s: lists / list_file_for(s, fraction) for s in _SPLITS}
    multilabel = spec.label_type == "multi-label"
    if spec.label_type == "auto":
        first = next((line.split() for line in _head_lines(files["train"]) if line.split()), [])
        multilabel = len(first) - 1 == len(names) and len(names) > 1 or len(names) == 1
    rows = {s: read_label_list(files[s], len(names), multilabel,
                               missing_hint="write the three list files, or use class folders or a labels CSV")
            for s in _SPLITS}
    problems = []
    for s in _SPLITS:
        for (name, _), k in zip(rows[s], list_lines(files[s]), strict=True):
            why = _outside(name)
            if why:
                problems.append(f"{files[s]}:{k}: {why}")
    raise_problems(problems, f"The list files have {len(problems)} path(s) outside the data root", lists)
    _refuse_single_class([r for s in _SPLITS for r in rows[s]], names, multilabel, files["train"])
    where = {s: [f"{files[s]}:{k}" for k in list_lines(files[s])] for s in _SPLITS}
    return CustomData("authors' lists", lists, tuple(names), multilabel, rows, where,
                      f"given: the list files in {lists}")


def _head_lines(path: Path, n: int = 20) -> list[str]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [f.readline() for _ in range(n)]


# -- splitting ----------------------------------------------------------------------------------------------------
def _strata(rows: list[tuple[str, np.ndarray]], multilabel: bool) -> list[str]:
    """A stratum per row: its class, or (multi-label) its rarest positive label ("none" without one)."""
    if not multilabel:
        return [str(int(y[0])) for _, y in rows]
    y = np.stack([r[1] for r in rows])
    freq = y.sum(0)
    return [str(int(np.argmin(np.where(row > 0, freq, np.inf)))) if row.any() else "none" for row in y]


def _shuffled_strata(strata: list[str], rng: np.random.Generator) -> list[np.ndarray]:
    """The item indices of each stratum (in sorted stratum order), each permuted by ``rng``."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    return [rng.permutation(groups[key]) for key in sorted(groups)]


def stratified_split(strata: list[str], seed: int, val: float, test: float) -> list[str]:
    """A split name per item: within each stratum a seeded permutation cut into test, val and train, each stratum
    of three or more items giving at least one to val and to test."""
    rng = np.random.default_rng(seed)
    out = ["train"] * len(strata)
    for idx in _shuffled_strata(strata, rng):
        n = len(idx)
        n_test, n_val = int(round(n * test)), int(round(n * val))
        if n >= 3:
            n_test, n_val = max(1, n_test), max(1, n_val)
        for i in idx[:n_test]:
            out[i] = "test"
        for i in idx[n_test:n_test + n_val]:
            out[i] = "val"
    return out


def _group_rows(rows: list[tuple[str, np.ndarray]], groups: list[str], multilabel: bool
                ) -> tuple[list[str], list[tuple[str, np.ndarray]]]:
    """The groups in first-seen order and a row standing for each: multi-label, the union of its images' labels;
    multi-class, its most frequent class (the lowest index on a tie)."""
    members: dict[str, list[np.ndarray]] = {}
    for (_, y), g in zip(rows, groups, strict=True):
        members.setdefault(g, []).append(y)
    out = []
    for g, ys in members.items():
        if multilabel:
            out.append((g, np.max(np.stack(ys), axis=0)))
        else:
            votes = Counter(int(y[0]) for y in ys)
            out.append((g, np.array([min(votes, key=lambda c: (-votes[c], c))], dtype=np.float32)))
    return list(members), out


def _split(data: CustomData, spec: CustomSpec, seed: int, groups: list[str] | None = None) -> CustomData:
    rows, where = data.rows.pop("all"), data.where.pop("all")
    if groups is None:
        assigned = stratified_split(_strata(rows, data.multilabel), seed, spec.val_fraction, spec.test_fraction)
    else:  # whole groups drawn, stratified by the label each group stands for
        names, group_rows = _group_rows(rows, groups, data.multilabel)
        drawn = dict(zip(names, stratified_split(_strata(group_rows, data.multilabel), seed, spec.val_fraction,
                                                 spec.test_fraction), strict=True))
        assigned = [drawn[g] for g in groups]
    data.rows = {s: [r for r, t in zip(rows, assigned, strict=True) if t == s] for s in _SPLITS}
    data.where = {s: [w for w, t in zip(where, assigned, strict=True) if t == s] for s in _SPLITS}
    empty = [s for s in _SPLITS if not data.rows[s]]
    what = f"{len(rows)} images" if groups is None else f"{len(set(groups))} {spec.group_column} groups"
    if empty:
        raise DataError(f"{data.source}: {what} are too few for a {' and '.join(empty)} split "
                        f"(--val-fraction {spec.val_fraction}, --test-fraction {spec.test_fraction}); add images.",
                        path=data.source)
    by = "" if groups is None else f" by {spec.group_column} ({what}, each in one split)"
    data.split = (f"made by ecamp: stratified{by}, seed {seed}, val {spec.val_fraction:g}, test "
                  f"{spec.test_fraction:g} ({SPLIT_FILE} repeats it)")
    return data


def _subsample(data: CustomData, fraction: int, seed: int) -> None:
    """Keep ``fraction`` % of the training rows (seeded, stratified, at least one per stratum)."""
    if fraction == 100:
        return
    rows, where = data.rows["train"], data.where["train"]
    strata = _strata(rows, data.multilabel)
    keep: list[int] = []
    for idx in _shuffled_strata(strata, np.random.default_rng(seed + 1)):
        keep += list(idx[:max(1, int(round(len(idx) * fraction / 100)))])
    keep.sort()
    data.rows["train"], data.where["train"] = [rows[i] for i in keep], [where[i] for i in keep]


def read_custom(spec: CustomSpec, *, fraction: int = 100, seed: int = 42) -> CustomData:
    """Read, check and split the user's data (module docstring); ``fraction`` % of the training rows are kept (the
    authors' lists: their ``train_list_{1,10}.txt``)."""
    if spec.lists is not None:
        data = _read_lists(spec, fraction)
    elif spec.labels_csv is not None:
        data = _read_csv(spec, seed)
    else:
        if spec.label_names:
            raise InvalidArgumentError("--label-names goes with --labels or --lists; class folders are named by "
                                       "their folders.")
        if spec.label_type == "multi-label":
            raise InvalidArgumentError("Class folders give one class per image; --label-type multi-label needs a "
                                       "labels CSV with one 0/1 column per label (--labels).")
        data = _read_folders(spec, seed)
    if data.layout != "authors' lists":
        _subsample(data, fraction, seed)
    data.counts = {s: _counts(data, s) for s in _SPLITS}
    for s in ("val", "test"):
        missing = [c for c, n in data.counts[s].items() if c != "images" and n == 0]
        if missing:
            logger.warning("The %s split has no positive image of %s: its score and operating point leave them "
                           "out.", s, ", ".join(missing))
    return data


def _counts(data: CustomData, split: str) -> dict[str, int]:
    rows = data.rows[split]
    if data.multilabel:
        y = np.stack([r[1] for r in rows]) if rows else np.zeros((0, len(data.labels)))
        per = {c: int(y[:, i].sum()) for i, c in enumerate(data.labels)}
    else:
        got = Counter(int(r[1][0]) for r in rows)
        per = {c: got.get(i, 0) for i, c in enumerate(data.labels)}
    return {"images": len(rows), **per}


def write_split_file(data: CustomData, out: Path) -> Path:
    """``OUT/splits.csv``: path, split and labels of every row the run uses, which ``--labels`` reads back."""
    from ecamp.fileio import write_csv

    header = ["path", "split", *(data.labels if data.multilabel else ["label"])]
    rows = []
    for s in _SPLITS:
        for name, y in data.rows[s]:
            labels = [f"{v:g}" for v in y] if data.multilabel else [data.labels[int(y[0])]]
            rows.append([name, s, *labels])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / SPLIT_FILE, header, rows)
    return out / SPLIT_FILE


class CustomClassificationTask(ClassificationTask):
    """A classifier on the user's own data (:func:`read_custom`); the rest is :class:`ClassificationTask`'s."""

    task_from_data = True

    def __init__(self, spec: CustomSpec, fraction: int = 100, mode: str = "finetune", *, seed: int = 42,
                 **options: Any):
        super().__init__(CUSTOM, fraction, mode, **options)
        self.spec, self.seed = spec, seed  # the split's seed: the run's

    def default_recipe(self) -> Recipe:
        from ecamp.train.downstream.recipes import recipe

        return recipe("cls", CUSTOM, self.fraction, self.mode)

    def check_lists(self, lists: Path) -> None:
        """Read and check the data first: the task (labels, multi-label or not) and its metric follow from it."""
        self.data = read_custom(self.spec, fraction=self.fraction, seed=self.seed)
        self.set_task(self.data.task)

    def load_rows(self, lists: Path, protocol: Protocol) -> tuple[dict[str, Path], dict[str, list]]:
        return {s: self.data.source for s in _SPLITS}, self.data.rows

    def check_rows(self, files: dict[str, Path], rows: dict[str, list], data_root: Path) -> None:
        entries = [(w, name) for s in _SPLITS for w, (name, _) in zip(self.data.where[s], rows[s], strict=True)]
        check_entries(entries, data_root, self.data.source)

    def prepare_rows(self, run: FinetuneRun) -> dict[str, list]:
        if run.runtime.main and run.output_dir is not None:
            write_split_file(self.data, run.output_dir)
        return super().prepare_rows(run)

    def protocol_note(self, run: FinetuneRun) -> str:
        return f"{self.data.layout} ({self.data.source}); split {self.data.split}"

    def metrics_fields(self, run: FinetuneRun) -> dict[str, Any]:
        return {**super().metrics_fields(run), "data": {
            "layout": self.data.layout, "source": str(self.data.source), "labels": list(self.data.labels),
            "label_type": "multi-label" if self.data.multilabel else "multi-class", "split": self.data.split,
            "counts": self.data.counts}}


def finetune_custom(spec: CustomSpec, fraction: int, output_dir: str | Path, *, mode: str = "finetune",
                    calibration: str = "auto", operating_point: str = "youden", pos_weight: Any = None,
                    class_weights: Any = None, seed: int = 42, **run_options: Any) -> dict[str, Any]:
    """:func:`~ecamp.train.downstream.classification.finetune_classification` on the user's data ``spec``
    (``ecamp train finetune --dataset custom``); ``run_options`` as there (model_name, recipe, num_workers...)."""
    head = CustomClassificationTask(spec, fraction, mode, seed=seed, calibration=calibration,
                                    operating_point=operating_point, pos_weight=pos_weight,
                                    class_weights=class_weights)
    return run_finetune(head, spec.data_root, output_dir, seed=seed, **run_options)
