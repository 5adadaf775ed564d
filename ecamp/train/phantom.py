"""A procedurally generated chest-film-like data set with findings at known places, and matching reports.

Each image is a grey frontal "radiograph": a bright body, two dark lung fields with rib shadows, a bright
mediastinum, spine and heart. Findings are drawn at known places and sizes:

* pleural **effusion** (left/right; small/large): a bright, meniscus-topped opacity at the lung base;
* lung **nodule** (left/right; small/large): a bright disc inside a lung;
* **cardiomegaly** (mild/severe): an enlarged heart silhouette;
* **pneumothorax** (left/right; small/large): a dark, rib-less apical region with a pleural line.

Reports use the entity words, descriptors (side, size, severity) and negations ("There is no pneumothorax.").
The data set is written in the authors' MIMIC-CXR pre-training layout, so the real reader is what tests exercise:

* ``images/*.png`` (8-bit);
* ``mimic-cxr-2.0.0-entity-llm.csv``: ``img_path, report, llm_output`` (a synthetic entity-centred context stands in
  for the LLM output);
* ``mimic-cxr-2.0.0-attn-label.csv``: ``img_path, label_i, label_j``, the 12x12 window (on the 14x14 grid) over the
  main finding (centre for normal images);
* ``labels.csv``: per image 0/1 per finding plus side and size, for probing;
* ``findings.csv``: ``img_path, finding, side, x1, y1, x2, y2, size``, the pixel box of each drawn finding (not
  cardiomegaly, which has no region) on a film of ``size`` pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ecamp.fileio import write_csv
from ecamp.train.pretrain.windows import AUTHORS_GRID, AUTHORS_WINDOW, window_around

__all__ = ["FINDINGS", "PhantomCase", "make_case", "write_phantom", "write_phantom_classification",
           "write_phantom_segmentation", "write_phantom_detection"]

FINDINGS = ("effusion", "nodule", "cardiomegaly", "pneumothorax")

_CONTEXT = {
    "effusion": "A pleural effusion is fluid between the lung and the chest wall; it blunts the costophrenic angle "
                "and rises along the lateral chest wall.",
    "nodule": "A nodule is a round opacity within the lung; its size and margins matter for follow-up.",
    "cardiomegaly": "Cardiomegaly is enlargement of the cardiac silhouette beyond half of the thoracic width.",
    "pneumothorax": "A pneumothorax is air in the pleural space; the collapsed lung edge is seen without lung "
                    "markings beyond it.",
}
_NEGATIONS = {
    "effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "nodule": ["No focal nodule.", "There is no evidence of nodule."],
    "cardiomegaly": ["Heart size is normal.", "No cardiomegaly."],
    "pneumothorax": ["There is no pneumothorax.", "No pneumothorax."],
}


@dataclass
class PhantomCase:
    image: np.ndarray  # uint8 [size, size]
    labels: dict[str, int]
    attrs: dict[str, str]
    report: str
    context: str
    window: tuple[int, int]  # (label_i, label_j) on the authors' 14x14 grid with a 12x12 window
    masks: dict[str, np.ndarray] | None = None  # uint8 0/255 [size, size] per finding present (not cardiomegaly)


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def make_case(rng: np.random.Generator, size: int = 256, p_finding: float = 0.35, variation: float = 1.0,
              force: tuple[str, ...] = (), report: str = "full") -> PhantomCase:
    """One phantom. ``variation`` scales the differences between patients and exposures (1: the default spread,
    0: every film alike apart from its findings); the random draws are the same whatever its value.

    ``report``: ``"full"`` names every finding, present or negated; ``"short"`` keeps only the sentences of the
    findings present ("Large left pleural effusion."), the same film with a report whose words all point at it."""
    if report not in ("full", "short"):
        from ecamp.errors import InvalidArgumentError

        raise InvalidArgumentError(f"report must be 'full' or 'short', got {report!r}.")
    # one function on purpose: the seeded draws happen in this order, and the written files are promised
    # byte-identical across versions
    s = size

    def vary(lo: float, hi: float) -> float:
        u = rng.uniform(lo, hi)
        return u if variation == 1 else (lo + hi) / 2 + (u - (lo + hi) / 2) * variation

    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # patients and exposures differ: body habitus, position, lung and heart size, tissue densities, devices
    img = np.full((s, s), vary(0.03, 0.15), np.float32)
    cx = s / 2 + rng.normal(0, s * 0.03) * variation
    cy = s * 0.55 + rng.normal(0, s * 0.02) * variation
    bw = vary(0.38, 0.47)
    body = _ellipse(yy, xx, cy, cx, s * 0.55, s * bw) < 1
    img[body] = vary(0.5, 0.7)
    lung_w, lung_h = vary(0.11, 0.15), vary(0.24, 0.31)
    lung_tone = vary(0.12, 0.3)
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):  # patient's right is on the image's left
        lx = cx + sign * s * (lung_w + 0.06 + rng.normal(0, 0.006) * variation)
        m = _ellipse(yy, xx, cy - s * 0.08, lx, s * lung_h, s * lung_w) < 1
        lungs[side] = (m, lx)
        img[m] = lung_tone
    ribs = (np.sin(yy / s * 2 * np.pi * vary(5.5, 8.5) + np.abs(xx - cx) / s * 6 + vary(0, 6))
            > vary(0.75, 0.9))
    for m, _ in lungs.values():
        img[m & ribs] += vary(0.08, 0.18)
    img[_ellipse(yy, xx, cy - s * 0.05, cx, s * 0.45, s * vary(0.035, 0.06)) < 1] = vary(0.7, 0.85)
    if rng.random() < 0.5 * variation:  # a line or tube crossing the chest
        x0, x1 = rng.uniform(0.25, 0.75, 2) * s
        t = np.linspace(0, 1, 4 * s)
        py = (0.1 + 0.6 * t) * s
        px = x0 + (x1 - x0) * t + 0.05 * s * np.sin(t * rng.uniform(2, 6))
        ok = (py >= 0) & (py < s) & (px >= 0) & (px < s)
        img[py[ok].astype(int), px[ok].astype(int)] = 0.95
    labels = {f: 0 for f in FINDINGS}
    attrs: dict[str, str] = {}
    sentences: list[str] = []
    focus: tuple[float, float] | None = None
    present = [f for f in FINDINGS if rng.random() < p_finding or f in force]
    regions: dict[str, np.ndarray] = {}
    heart_rx = s * vary(0.095, 0.12)
    if "cardiomegaly" in present:
        sev = "severe" if rng.random() < 0.5 else "mild"
        heart_rx = s * (rng.uniform(0.16, 0.18) if sev == "severe" else rng.uniform(0.135, 0.15))
        labels["cardiomegaly"], attrs["cardiomegaly_size"] = 1, sev
        sentences.append(f"{sev.capitalize()} cardiomegaly.")
        focus = focus or (cy + s * 0.08, cx + s * 0.03)
    img[_ellipse(yy, xx, cy + s * 0.08, cx + s * 0.03, s * vary(0.1, 0.12), heart_rx) < 1] = vary(0.65, 0.8)
    for finding in ("effusion", "nodule", "pneumothorax"):
        if finding not in present:
            continue
        side = "left" if rng.random() < 0.5 else "right"
        large = rng.random() < 0.5
        mask, lx = lungs[side]
        labels[finding] = 1
        attrs[f"{finding}_side"], attrs[f"{finding}_size"] = side, "large" if large else "small"
        size_word = "large" if large else "small"
        if finding == "effusion":
            level = cy + s * (0.0 if large else 0.1) + 3 * np.abs(xx - lx) ** 1.2 / s * 2
            region = mask & (yy > level)
            regions["effusion"] = region
            img[region] = img[region] * 0.3 + rng.uniform(0.45, 0.6)
            sentences.append(f"{size_word.capitalize()} {side} pleural effusion.")
            focus = focus or (cy + s * 0.12, lx)
        elif finding == "nodule":
            ny = cy - s * rng.uniform(0.0, 0.2)
            nx = lx + rng.uniform(-0.05, 0.05) * s
            r = s * (0.045 if large else 0.025)
            disc = (_ellipse(yy, xx, ny, nx, r, r) < 1) & mask
            regions["nodule"] = disc
            img[disc] = img[disc] + rng.uniform(0.25, 0.4)
            sentences.append(f"{size_word.capitalize()} {side} lung nodule.")
            focus = focus or (ny, nx)
        else:
            top = cy - s * 0.08 - s * lung_h
            depth = s * (0.22 if large else 0.12)
            apex = mask & (yy < top + depth)
            regions["pneumothorax"] = apex
            img[apex] = lung_tone * 0.3
            edge = mask & (np.abs(yy - (top + depth)) < 1.5)
            img[edge] = lung_tone + 0.25
            sentences.append(f"{size_word.capitalize()} {side} pneumothorax.")
            focus = focus or (top + depth / 2, lx)
    negatives = [f for f in FINDINGS if f not in present]
    for f in negatives:
        sentences.append(_NEGATIONS[f][int(rng.integers(len(_NEGATIONS[f])))])
    n_positive = len(sentences) - len(negatives)  # the "short" report drops the rest after the same draws
    if not present:
        sentences.insert(0, "The lungs are clear.")
    order = rng.permutation(len(sentences))
    if report == "short" and present:
        order = [i for i in order if i < n_positive]
    text = " ".join(sentences[i] for i in order)
    context = " ".join(_CONTEXT[f] for f in present)
    # soft tissue, blur and noise: a film, not a cartoon
    from PIL import Image, ImageFilter

    img = np.clip(img, 0, 1) ** vary(0.7, 1.4) * vary(0.75, 1.15) + vary(-0.08, 0.08)
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    angle = vary(-6, 6)
    pil = pil.rotate(angle, resample=Image.BILINEAR, fillcolor=int(np.clip(img[0, 0] * 255, 0, 255)))
    masks = {k: np.asarray(Image.fromarray(v.astype(np.uint8) * 255).rotate(angle, resample=Image.NEAREST))
             for k, v in regions.items()}
    pil = pil.filter(ImageFilter.GaussianBlur(s / 256 * vary(0.8, 2.2)))
    arr = np.asarray(pil).astype(np.float32) + rng.normal(0, vary(3, 10), (s, s))
    image = np.clip(arr, 0, 255).astype(np.uint8)
    window = window_around(focus[0] / s, focus[1] / s, AUTHORS_GRID, AUTHORS_WINDOW) if focus else (1, 1)
    return PhantomCase(image, labels, attrs, text, context, window, masks)


def _films(root: Path, n: int, seed: int, prefix: str, make: Callable[[np.random.Generator], PhantomCase],
           progress: bool) -> Iterator[tuple[str, PhantomCase]]:
    """``n`` cases from one generator seeded with ``seed``, each film saved as ``images/<prefix><seed>_<i>.png``;
    yields (relative path, case)."""
    from PIL import Image

    from ecamp.console import progress_bar

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in progress_bar(range(n), desc="phantom", unit="film", disable=not progress):
        case = make(rng)
        rel = f"images/{prefix}{seed:04d}_{i:06d}.png"
        Image.fromarray(case.image).save(root / rel)
        yield rel, case


def write_phantom(out: str | os.PathLike, n: int, seed: int = 0, size: int = 256, progress: bool = False,
                  variation: float = 1.0, p_finding: float = 0.35, force: tuple[str, ...] = (),
                  report: str = "full", one_of: tuple[str, ...] = ()) -> Path:
    """Write ``n`` phantom cases in the authors' MIMIC-CXR layout under ``out``; returns the folder. Each finding
    appears with probability ``p_finding``; those in ``force`` always do; with ``one_of``, every film also shows
    one finding drawn uniformly from it. ``report`` as in :func:`make_case`."""
    from ecamp.errors import InvalidArgumentError

    if n < 1:
        raise InvalidArgumentError(f"--n must be at least 1, got {n}.")
    root = Path(out)
    reports, windows, labels, boxes = [], [], [], []
    unknown = sorted((set(force) | set(one_of)) - set(FINDINGS))
    if unknown:
        raise InvalidArgumentError(f"Unknown phantom finding(s) {unknown}; they are {list(FINDINGS)}.")

    def make(rng: np.random.Generator) -> PhantomCase:
        drawn = (one_of[int(rng.integers(len(one_of)))],) if one_of else ()
        return make_case(rng, size, p_finding=p_finding, variation=variation, force=(*force, *drawn), report=report)

    for rel, case in _films(root, n, seed, "p", make, progress):
        for finding, mask in (case.masks or {}).items():
            if mask.any():
                ys, xs = np.nonzero(mask)
                boxes.append([rel, finding, case.attrs.get(f"{finding}_side", ""), int(xs.min()), int(ys.min()),
                              int(xs.max()) + 1, int(ys.max()) + 1, size])
        reports.append([rel, case.report, case.context])
        windows.append([rel, *case.window])
        labels.append([rel, *[case.labels[f] for f in FINDINGS],
                       *[case.attrs.get(f"{f}_side", "") for f in ("effusion", "nodule", "pneumothorax")],
                       *[case.attrs.get(f"{f}_size", "") for f in FINDINGS]])
    write_csv(root / "mimic-cxr-2.0.0-entity-llm.csv", ["img_path", "report", "llm_output"], reports)
    write_csv(root / "mimic-cxr-2.0.0-attn-label.csv", ["img_path", "label_i", "label_j"], windows)
    write_csv(root / "labels.csv", ["img_path", *FINDINGS, "effusion_side", "nodule_side", "pneumothorax_side",
                                     *[f"{f}_size" for f in FINDINGS]], labels)
    write_csv(root / "findings.csv", ["img_path", "finding", "side", "x1", "y1", "x2", "y2", "size"], boxes)
    return root


def write_phantom_classification(out: str | os.PathLike, n: int, seed: int = 0, size: int = 256,
                                 progress: bool = False, variation: float = 1.0) -> Path:
    """Phantom films with the authors' classification list files (``train_list{,_1,_10}.txt``, ``val_list.txt``,
    ``test_list.txt``; labels effusion, nodule, cardiomegaly, pneumothorax) for ``ecamp train finetune --dataset
    phantom``."""
    from ecamp.errors import InvalidArgumentError
    from ecamp.train.downstream.classification import write_splits

    if n < 10:
        raise InvalidArgumentError(f"--n must be at least 10 for a train/val/test split, got {n}.")
    root = Path(out)
    make = partial(make_case, size=size, variation=variation)
    items = [(rel, [float(case.labels[f]) for f in FINDINGS]) for rel, case in _films(root, n, seed, "c", make,
                                                                                      progress)]
    write_splits(items, root, seed=seed)
    return root


def write_phantom_segmentation(out: str | os.PathLike, n: int, seed: int = 0, size: int = 256,
                               finding: str = "effusion", progress: bool = False, variation: float = 1.0) -> Path:
    """Phantom films that all show ``finding``, with its mask (``masks/*.png``, 0/255) and list files
    ``{train_list,train_list_1,train_list_10,val_list,test_list}.csv`` with ``img_path,mask_path``, the layout
    ``ecamp train finetune --dataset phantom-seg --head seg`` reads."""
    from PIL import Image

    from ecamp.errors import InvalidArgumentError

    if finding not in ("effusion", "nodule", "pneumothorax"):
        raise InvalidArgumentError(f"Segmentation phantoms exist for effusion, nodule and pneumothorax, not "
                                   f"{finding!r}.")
    root = Path(out)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    make = partial(make_case, size=size, p_finding=0.0, variation=variation, force=(finding,))
    for rel, case in _films(root, n, seed, "s", make, progress):
        msk = "masks/" + rel.split("/", 1)[1]
        Image.fromarray(case.masks[finding]).save(root / msk)
        rows.append([rel, msk])
    _write_split_csvs(root, ["img_path", "mask_path"], rows, seed)
    return root


def _write_split_csvs(root: Path, header: list[str], rows: list[list], seed: int) -> None:
    """Seeded test (20 %), validation (10 %) and train lists with nested 10 % and 1 % subsets, as CSV files."""
    from ecamp.train.downstream.classification import split_indices

    n = len(rows)
    for stem, idx in split_indices(n, seed, max(1, n // 5), max(1, n // 10)).items():
        write_csv(root / f"{stem}.csv", header, [rows[i] for i in idx])


def write_phantom_detection(out: str | os.PathLike, n: int, seed: int = 0, size: int = 256,
                            finding: str = "effusion", p_finding: float = 0.7, progress: bool = False,
                            variation: float = 1.0) -> Path:
    """Phantom films, a share ``p_finding`` of them showing ``finding``, with its bounding box in the authors' RSNA
    detection format: ``image_path,bbox`` lists (``train_list{,_1,_10}.csv``, ``val_list.csv``,
    ``test_list.csv``), boxes ``[[x1, y1, x2, y2]]`` in pixels, ``[[0, 0, 0, 0]]`` for films without it; the layout
    ``ecamp train finetune --dataset phantom-det --head det`` reads."""
    from ecamp.errors import InvalidArgumentError

    if finding not in ("effusion", "nodule", "pneumothorax"):
        raise InvalidArgumentError(f"Detection phantoms exist for effusion, nodule and pneumothorax, not {finding!r}.")
    if n < 10:
        raise InvalidArgumentError(f"--n must be at least 10 for a train/val/test split, got {n}.")
    root = Path(out)

    def make(rng: np.random.Generator) -> PhantomCase:
        show = rng.random() < p_finding
        return make_case(rng, size, p_finding=0.0, variation=variation, force=(finding,) if show else ())

    rows = []
    for rel, case in _films(root, n, seed, "d", make, progress):
        box, mask = [0, 0, 0, 0], (case.masks or {}).get(finding)
        if mask is not None and mask.any():
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        rows.append([rel, str([box])])
    _write_split_csvs(root, ["image_path", "bbox"], rows, seed)
    return root
