"""Pictures of super-resolution windows (``ecamp train sr-windows --save-maps DIR``): the film, the method's patch
map as a heat overlay, the chosen window, and what the data knows: its own window labels (a phantom's true windows,
or the authors' windows for MIMIC-CXR) and a phantom's finding boxes (``findings.csv``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ecamp.maps import new_figure, save_figure
from ecamp.train.pretrain.windows import AUTHORS_GRID, AUTHORS_WINDOW

__all__ = ["MapWriter"]

_WINDOWS_CSV = "mimic-cxr-2.0.0-attn-label.csv"
_BOXES_CSV = "findings.csv"


class MapWriter:
    """Writes one PNG per film into ``out``; reads the data root's window labels and finding boxes if present."""

    def __init__(self, out: str | Path, data_root: str | Path, *, method: str):
        from ecamp.train.common.lists import read_table

        new_figure()  # matplotlib checked here, before the long run
        self.out, self.method = Path(out), method
        self.out.mkdir(parents=True, exist_ok=True)
        root = Path(data_root)
        self.windows: dict[str, tuple[int, int]] = {}
        if (root / _WINDOWS_CSV).is_file():
            for r in read_table(root / _WINDOWS_CSV, ["img_path", "label_i", "label_j"]):
                if r["label_i"] != "" and r["label_j"] != "":
                    self.windows[r["img_path"]] = (int(r["label_i"]), int(r["label_j"]))
        self.boxes: dict[str, list[tuple[str, list[float], int]]] = {}
        if (root / _BOXES_CSV).is_file():
            for r in read_table(root / _BOXES_CSV, ["img_path", "finding", "x1", "y1", "x2", "y2", "size"]):
                box = [float(r[k]) for k in ("x1", "y1", "x2", "y2")]
                self.boxes.setdefault(r["img_path"], []).append((r["finding"], box, int(r["size"])))

    def write(self, img_path: str, report: str, film, patch_map: np.ndarray, offset: tuple[int, int], grid: int,
              window: int) -> Path:
        """``film``: the [H, W] image the model read; ``patch_map``: [grid, grid]; ``offset``: the chosen window's
        top-left cell on the model's grid."""
        from matplotlib.patches import Rectangle

        film = np.asarray(film, dtype=np.float32)
        h, w = film.shape
        fig = new_figure(figsize=(5.2, 5.8), dpi=110)
        ax = fig.subplots()
        ax.imshow(film, cmap="gray", extent=(0, w, h, 0))
        heat = ax.imshow(patch_map, cmap="inferno", alpha=0.45, extent=(0, w, h, 0), interpolation="nearest")
        cell = h / grid
        ax.add_patch(Rectangle((offset[1] * cell, offset[0] * cell), window * cell, window * cell, fill=False,
                               ec="cyan", lw=2.2, label=f"chosen window ({self.method})"))
        if img_path in self.windows:
            i, j = self.windows[img_path]
            c = h / AUTHORS_GRID
            ax.add_patch(Rectangle((j * c, i * c), AUTHORS_WINDOW * c, AUTHORS_WINDOW * c, fill=False, ec="lime",
                                   lw=1.6, ls="--", label="the data's window label"))
        for k, (finding, (x1, y1, x2, y2), size) in enumerate(self.boxes.get(img_path, [])):
            s = w / size
            ax.add_patch(Rectangle((x1 * s, y1 * s), (x2 - x1) * s, (y2 - y1) * s, fill=False, ec="yellow", lw=1.4,
                                   ls=":", label="finding box" if k == 0 else None))
            ax.text(x1 * s, max(y1 * s - 2, 6), finding, color="yellow", fontsize=8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xlabel("x (pixels; patient's right on the image's left)")
        ax.set_ylabel("y (pixels)")
        ax.set_title("\n".join(textwrap.wrap(report, 60)[:3]), fontsize=9)
        label = "P(patch in the window | the words)" if self.method == "occlusion" else f"{self.method} relevance"
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04, label=label)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.3), fontsize=8, ncol=2, frameon=False)
        return save_figure(fig, self.out / (Path(img_path).stem + ".png"), dpi=110, bbox_inches="tight")
