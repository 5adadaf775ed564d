"""Pre-training data: the authors' MIMIC-CXR layout, an FFA-IR converter, augmentation and report encoding.

Layout (dossier 4.1), under ``data_root``:

* ``mimic-cxr-2.0.0-entity-llm.csv`` with columns ``img_path, report, llm_output`` (image paths relative to
  ``data_root/image_root``);
* ``mimic-cxr-2.0.0-attn-label.csv`` with ``label_i, label_j``: the top-left cell (row, column) of the 12x12
  super-resolution window on the 14x14 grid. The authors aligned the two files by row; when both have an
  ``img_path`` column ecamp joins on it instead.

Every sample is a pure function of (seed, epoch, index): image augmentation, context insertion and masking draw
from generators seeded with those three numbers, so results do not depend on the number of ranks or workers, and
a resumed run sees exactly the samples the interrupted one would have.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecamp.errors import DataError, EcampError
from ecamp.fileio import write_csv
from ecamp.train.common.lists import LAYOUT_HINT, check_paths, list_lines, raise_problems, read_table
from ecamp.train.pretrain.windows import AUTHORS_GRID, AUTHORS_WINDOW, map_window, window_around

__all__ = ["DataError", "PretrainDataset", "ResumableSampler", "collate_pretrain", "ffa_ir_to_csv",
           "read_table", "map_window", "swap_sides", "read_pretrain_rows", "check_pretrain_data"]


def read_pretrain_rows(data_root: str | Path, d: Any
                       ) -> tuple[list[tuple[str, str, str]], list[tuple[int, int] | None]]:
    """The reports CSV's ``(img_path, report, llm_output)`` rows and each row's SR window label (None: no entity,
    left to ``data.default_window``). Bad window rows are reported together, with file and line."""
    root = Path(data_root)
    rows = read_table(root / d.reports_csv, ["img_path", "report", "llm_output"], missing_hint=LAYOUT_HINT)
    items = [(r["img_path"], r["report"], r["llm_output"]) for r in rows]
    windows: list[tuple[int, int] | None] = [None] * len(items)
    if not d.windows_csv:
        return items, windows
    wpath = root / d.windows_csv
    wrows = read_table(wpath, ["label_i", "label_j"], missing_hint=LAYOUT_HINT)
    if "img_path" in wrows[0]:
        row_of = {r["img_path"]: k for k, r in enumerate(wrows)}
        unmatched = [k for k, (path, _, _) in enumerate(items) if path not in row_of]
        if unmatched:
            lines = list_lines(root / d.reports_csv)
            raise_problems([f"{root / d.reports_csv}:{lines[k]}: {items[k][0]} has no row in {wpath}"
                            for k in unmatched], f"{wpath} has no window for {len(unmatched)} image(s)", wpath)
        order = [row_of[path] for path, _, _ in items]
    elif len(wrows) != len(items):
        raise DataError(f"{wpath} has {len(wrows)} rows but {d.reports_csv} has {len(items)}; without an img_path "
                        f"column they are matched by row and must be equally long.", path=wpath)
    else:
        order = list(range(len(items)))
    top = AUTHORS_GRID - AUTHORS_WINDOW
    bad: list[tuple[int, str]] = []  # (window row, problem)
    for i, k in enumerate(order):
        r = wrows[k]
        if not (r["label_i"] or "").strip() and not (r["label_j"] or "").strip():
            continue  # no window (no entity): data.default_window decides, per epoch if "random"
        try:
            li, lj = int(r["label_i"]), int(r["label_j"])
        except (TypeError, ValueError) as e:  # TypeError: a short row
            bad.append((k, f"window labels must be integers ({e})"))
            continue
        if not (0 <= li <= top and 0 <= lj <= top):
            bad.append((k, f"window ({li}, {lj}) is outside 0..{top}; a {AUTHORS_WINDOW}x{AUTHORS_WINDOW} window "
                           f"must fit the {AUTHORS_GRID}x{AUTHORS_GRID} grid"))
            continue
        windows[i] = (li, lj)
    if bad:
        lines = list_lines(wpath)
        shown = list(dict.fromkeys(f"{wpath}:{lines[k]}: {msg}" for k, msg in bad))  # joined rows: once each
        raise_problems(shown, f"{wpath} has {len(shown)} bad row(s)", wpath)
    return items, windows


def check_pretrain_data(data_root: str | Path, d: Any) -> int:
    """Everything pre-training reads before its first step: the tokenizer file (if one is given), the reports and
    windows CSVs and that every image path is a regular file. Raises one :class:`DataError` naming file, line and
    path of the first problems with their count; returns the number of samples."""
    root = Path(data_root)
    if d.tokenizer:
        tok = Path(d.tokenizer) if Path(d.tokenizer).is_absolute() else root / d.tokenizer
        if not tok.is_file():
            raise DataError(f"data.tokenizer {tok} is not a file; give the tokenizers JSON (e.g. the authors' "
                            f"mimic_wordpiece.json) or data.tokenizer=null to train one on the reports.", path=tok)
    items, _ = read_pretrain_rows(root, d)
    check_paths({root / d.reports_csv: [path for path, _, _ in items]}, root / d.image_root)
    return len(items)


def film_tensor(image: Any, d: Any) -> torch.Tensor:
    """An 8-bit PIL film (after any geometry) -> grey ``[3, H, W]`` normalised with the data config's mean/std."""
    from torchvision.transforms.v2 import functional as F

    from ecamp.transforms import normalize_grey

    if image.mode != "L":
        image = image.convert("L")
    return normalize_grey(F.to_dtype(F.to_image(image), torch.float32, scale=True), d.mean, d.std)


def read_film(path: str | Path, d: Any, size: int) -> torch.Tensor:
    """The pre-training reader without augmentation: a file at ``size`` x ``size`` (bicubic), grey, normalised."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from ecamp.io import read_image_native
    from ecamp.transforms import to_uint8

    pil = Image.fromarray(to_uint8(read_image_native(path, policy=d.image_policy)))
    return film_tensor(F.resize(pil, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True), d)


def _sample_seed(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, epoch, index])


class PretrainDataset(torch.utils.data.Dataset):
    """Samples for :class:`ecamp.models.ECAMPPretrainModel`; unreadable samples come back as ``{"error": ...}``."""

    def __init__(self, data_root: str | Path, cfg: Any, encoder: Any, *, seed: int = 0):
        from ecamp.models.pretrain import ECAMPPretrainConfig

        self.root = Path(data_root)
        self.cfg = cfg
        self.model_cfg: ECAMPPretrainConfig = cfg.model
        self.data_cfg = cfg.data
        self.encoder = encoder
        self.seed = seed
        self.epoch = 0
        self.items, self.windows = read_pretrain_rows(self.root, self.data_cfg)
        from torchvision.transforms import InterpolationMode

        self.size = self.model_cfg.sr_img_size
        self.interp = InterpolationMode.BICUBIC

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _augment(self, image: Any, rng_seed: int):
        """RandomResizedCrop(448, scale 0.2-1, bicubic) + horizontal flip + grey + normalise, as torchvision draws
        them, under a private seed; returns the tensor and the (top, left, height, width, flipped) crop."""
        from torchvision.transforms import v2 as T
        from torchvision.transforms.v2 import functional as F

        d = self.data_cfg
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(rng_seed)  # the CPU generator only: GPU streams untouched
            top, left, h, w = T.RandomResizedCrop.get_params(image, scale=list(d.crop_scale),
                                                             ratio=[3.0 / 4.0, 4.0 / 3.0])
            image = F.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=self.interp,
                                   antialias=True)
            flipped = bool(d.hflip and torch.rand(1) < 0.5)
        if flipped:
            image = F.horizontal_flip(image)
        return film_tensor(image, d), (top, left, h, w, flipped)

    def _window(self, index: int, rng: np.random.Generator, crop, orig_hw) -> tuple[int, int]:
        cfg, d = self.model_cfg, self.data_cfg
        g, win = cfg.grid, cfg.sr_window
        label = self.windows[index]
        if label is None:
            if d.default_window == "random":
                return int(rng.integers(0, g - win + 1)), int(rng.integers(0, g - win + 1))
            return (g - win) // 2, (g - win) // 2
        mapped = map_window(label, g, win)
        if not d.sr_window_follows_augmentation:
            return mapped  # the authors: the window ignores the crop and flip
        top, left, h, w, flipped = crop
        H, W = orig_hw
        # the window's centre in original pixels, through the crop (and flip), to the nearest window on the grid
        cy = (mapped[0] + win / 2) / g * H
        cx = (mapped[1] + win / 2) / g * W
        ny = (cy - top) / h
        nx = (cx - left) / w
        if flipped:
            nx = 1 - nx
        return window_around(ny, nx, g, win)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        from ecamp.io import read_image_native
        from ecamp.transforms import to_uint8

        path, report, context = self.items[index]
        full = self.root / self.data_cfg.image_root / path
        ss = _sample_seed(self.seed, self.epoch, index)
        torch_seed, np_seed = ss.generate_state(2)
        rng = np.random.default_rng(np_seed)
        try:
            arr = read_image_native(full, policy=self.data_cfg.image_policy)
            pil = Image.fromarray(to_uint8(arr))
            x, crop = self._augment(pil, int(torch_seed))
            if crop[4] and self.data_cfg.hflip_swaps_sides:
                report, context = swap_sides(report), swap_sides(context or "")
            text = self.encoder(report, context or None, rng)
        except EcampError as e:
            return {"error": str(e), "index": index}
        window = self._window(index, rng, crop, arr.shape[:2])
        out = {k: torch.from_numpy(v) for k, v in text.items()}
        # the MAE masking noise, per sample: masking then does not depend on ranks, batch layout or resumes
        noise = torch.from_numpy(rng.random(self.model_cfg.grid**2).astype(np.float32))
        out.update(image=x, sr_window=torch.tensor(window, dtype=torch.long), noise=noise,
                   index=torch.tensor(index))
        return out


_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """Exchange the words "left" and "right" (keeping their case): the report of a horizontally flipped film."""

    def swap(m: re.Match) -> str:
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDES.sub(swap, text)


def collate_pretrain(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples; report the bad ones (``n_bad``, ``errors``) so the loop can count and bound them."""
    good = [it for it in items if "error" not in it]
    bad = [it["error"] for it in items if "error" in it]
    batch: dict[str, Any] = {}
    if good:
        batch = {k: torch.stack([it[k] for it in good]) for k in good[0]}
    batch["n_bad"] = len(bad)
    batch["errors"] = bad
    return batch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch shuffle split across ranks (like ``DistributedSampler``), that can start mid-epoch."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world = n, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s order and skip this rank's first ``start`` samples (the part a resumed run has seen)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.per_rank * self.world
        order = np.concatenate([order, order[: total - self.n]]) if total > self.n else order
        mine = order[self.rank:total:self.world]
        return iter(mine[self.start:].tolist())


def ffa_ir_to_csv(annotation_json: str | Path, out_csv: str | Path, splits: Sequence[str] = ("train",)) -> int:
    """Write the pre-training CSV (``img_path, report, llm_output``) for FFA-IR from its annotation JSON.

    Our reading of the FFA-IR release (the authors published no FFA-IR code): ``{"train": {case_id: {"Image_path":
    [...], "En_Report": "..."}}, "val": ..., "test": ...}``, one report per case shared by all its angiography
    frames, each frame becoming one row. ``llm_output`` is left empty for ``ecamp distill`` to fill. Returns the
    number of rows.
    """
    data = json.loads(Path(annotation_json).read_text(encoding="utf-8"))
    rows = []
    for split in splits:
        if split not in data:
            raise DataError(f"{annotation_json} has no split {split!r}; it has {sorted(data)}.", path=annotation_json)
        for case in data[split].values():
            images = case.get("Image_path") or case.get("image_path") or []
            report = case.get("En_Report") or case.get("en_report") or case.get("Report") or ""
            if not images or not str(report).strip():
                continue
            rows.extend([img, str(report).strip(), ""] for img in images)
    if not rows:
        raise DataError(f"{annotation_json}: no case with images and an English report in {list(splits)}.",
                        path=annotation_json)
    write_csv(out_csv, ["img_path", "report", "llm_output"], rows)  # atomically: no half-written CSV
    return len(rows)
