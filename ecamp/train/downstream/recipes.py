"""The authors' downstream hyper-parameters (dossier 9.2-9.4) as typed recipes, and their YAML preset files.

One :class:`Recipe` per (head, task, label percentage, mode) row of the authors' scripts: ``run_ft.sh`` and
``run_lp.sh`` for classification (SGD, momentum 0.9, no weight decay, early stopping after 20 evaluations),
the segmentation ``run.sh`` (AdamW, weight decay 0.05, patience 40) and the detection script (AdamW 5e-4, weight
decay 0.05, patience 20, neck expansion 8 for 1/10 % and 4 for 100 %). The presets shipped in
``ecamp/train/presets/finetune/`` hold the same rows as files (``ecamp train finetune --config NAME``); a test keeps
the two in agreement.

Tasks without a row of their own (the fundus classification tasks, for which the authors published no settings,
and the phantom data sets) use the ChestX-ray14, SIIM or RSNA row of the same percentage: our choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecamp.errors import ConfigError, InvalidArgumentError
from ecamp.schema import values as schema_values

__all__ = ["Recipe", "RECIPES", "recipe", "load_preset", "preset_text", "HEADS", "MODES"]

HEADS = ("cls", "seg", "det")
MODES = ("finetune", "linear-probe")


@dataclass(frozen=True)
class Recipe:
    steps: int
    lr: float
    warmup: int
    batch_size: int
    # "sgd" (momentum 0.9) or "adamw" (betas 0.9, 0.999)
    optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "adamw")})
    weight_decay: float = 0.0
    patience: int = 20  # evaluations without improvement before stopping; 0 disables early stopping
    eval_every: int | None = None  # optimizer steps between evaluations; None: once per epoch, as the authors
    start_eval: int = 0  # no evaluation before this step (the detection script's start_eval)
    eval_batch_size: int = 256
    expansion: int | None = None  # detection neck bottleneck expansion
    # fp32, bf16 or fp16 (the authors trained in apex fp16 O2)
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16", "fp16")})

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _cls(steps: int, lr: float, warmup: int, batch: int) -> Recipe:
    return Recipe(steps, lr, warmup, batch)


def _seg(steps: int, lr: float, warmup: int, batch: int, patience: int = 40) -> Recipe:
    return Recipe(steps, lr, warmup, batch, optimizer="adamw", weight_decay=0.05, patience=patience, eval_batch_size=64)


def _det(steps: int, warmup: int, batch: int, start_eval: int, expansion: int) -> Recipe:
    return Recipe(steps, 5e-4, warmup, batch, optimizer="adamw", weight_decay=0.05, patience=20,
                  start_eval=start_eval, eval_batch_size=64, expansion=expansion)


# (head, task, percent, mode) -> recipe
RECIPES: dict[tuple[str, str, int, str], Recipe] = {
    ("cls", "chestx-ray14", 1, "finetune"): _cls(3000, 3e-2, 50, 96),
    ("cls", "chestx-ray14", 10, "finetune"): _cls(3000, 2.4e-2, 50, 768),
    ("cls", "chestx-ray14", 100, "finetune"): _cls(30000, 1e-2, 500, 768),
    ("cls", "chestx-ray14", 1, "linear-probe"): _cls(3000, 3e-2, 50, 96),
    ("cls", "chestx-ray14", 10, "linear-probe"): _cls(30000, 2.4e-2, 50, 768),
    ("cls", "chestx-ray14", 100, "linear-probe"): _cls(30000, 1e-2, 500, 768),
    ("cls", "chexpert", 1, "finetune"): _cls(30000, 3e-3, 50, 768),
    ("cls", "chexpert", 10, "finetune"): _cls(90000, 5e-3, 1500, 768),
    ("cls", "chexpert", 100, "finetune"): _cls(90000, 4e-3, 1500, 768),
    ("cls", "chexpert", 1, "linear-probe"): _cls(9000, 3e-3, 150, 768),
    ("cls", "chexpert", 10, "linear-probe"): _cls(9000, 3e-2, 1500, 1024),
    ("cls", "chexpert", 100, "linear-probe"): _cls(22500, 3e-2, 3750, 4096),
    ("cls", "rsna", 1, "finetune"): _cls(2000, 3e-3, 50, 256),
    ("cls", "rsna", 10, "finetune"): _cls(9000, 3e-3, 50, 768),
    ("cls", "rsna", 100, "finetune"): _cls(90000, 3e-3, 150, 768),
    ("cls", "rsna", 1, "linear-probe"): _cls(1000, 1e-2, 50, 96),
    ("cls", "rsna", 10, "linear-probe"): _cls(5000, 1e-2, 50, 768),
    ("cls", "rsna", 100, "linear-probe"): _cls(9000, 1e-2, 150, 4096),
    ("cls", "covidx", 1, "finetune"): _cls(30000, 3e-2, 50, 256),
    ("cls", "covidx", 10, "finetune"): _cls(30000, 1e-2, 50, 768),
    ("cls", "covidx", 100, "finetune"): _cls(30000, 1e-2, 50, 768),
    ("cls", "covidx", 1, "linear-probe"): _cls(500, 3e-2, 30, 128),
    ("cls", "covidx", 10, "linear-probe"): _cls(5000, 3e-2, 350, 128),
    ("cls", "covidx", 100, "linear-probe"): _cls(9000, 3e-2, 1750, 256),
    ("seg", "siim", 1, "finetune"): _seg(3000, 5e-4, 50, 512),
    ("seg", "siim", 10, "finetune"): _seg(3000, 5e-4, 150, 1024),
    ("seg", "siim", 100, "finetune"): _seg(3000, 5e-4, 50, 512),
    ("seg", "rsna", 1, "finetune"): _seg(3000, 3e-4, 50, 96),
    ("seg", "rsna", 10, "finetune"): _seg(1000, 5e-4, 50, 256),
    ("seg", "rsna", 100, "finetune"): _seg(1000, 3e-3, 100, 512),
    ("seg", "riga", 1, "finetune"): _seg(500, 5e-4, 15, 5),
    ("seg", "riga", 10, "finetune"): _seg(500, 5e-4, 15, 56),
    ("seg", "riga", 100, "finetune"): _seg(1000, 5e-4, 20, 128),
    ("det", "rsna", 1, "finetune"): _det(3000, 5, 96, 60, 8),
    ("det", "rsna", 10, "finetune"): _det(3000, 5, 256, 100, 8),
    ("det", "rsna", 100, "finetune"): _det(20000, 30, 1024, 50, 4),
}

_FALLBACK = {"cls": "chestx-ray14", "seg": "siim", "det": "rsna"}


def recipe(head: str, task: str, fraction: int, mode: str = "finetune") -> Recipe:
    """The authors' row for this run, or the fallback row of the same head and percentage (module docstring)."""
    if head not in HEADS:
        raise InvalidArgumentError(f"--head must be one of {HEADS}, got {head!r}.")
    if fraction not in (1, 10, 100):
        raise InvalidArgumentError(f"--fraction must be 1, 10 or 100, got {fraction}.")
    if head != "cls" and mode != "finetune":
        raise InvalidArgumentError(f"--mode {mode} exists for classification only; dense heads always train on a "
                                   f"frozen encoder.")
    return RECIPES.get((head, task, fraction, mode)) or RECIPES[(head, _FALLBACK[head], fraction, mode)]


@dataclass(frozen=True)
class _Preset(Recipe):
    """The keys of a preset file: the run (head, dataset, fraction, mode) and any :class:`Recipe` field."""

    head: str = field(default="cls", metadata={"choices": HEADS})
    dataset: str = ""
    fraction: int = field(default=100, metadata={"choices": (1, 10, 100)})
    mode: str = field(default="finetune", metadata={"choices": MODES})


_RUN_KEYS = ("head", "dataset", "fraction", "mode")


def preset_text(key: tuple[str, str, int, str]) -> str:
    """The YAML preset file for one row of :data:`RECIPES`."""
    head, task, fraction, mode = key
    r = RECIPES[key]
    source = {"cls": "run_lp.sh" if mode == "linear-probe" else "run_ft.sh", "seg": "Segmentation/run.sh",
              "det": "Detection scripts"}[head]
    lines = [f"# {task}, {fraction} % of the training labels, {mode} ({head} head): the authors' {source} row.",
             f"head: {head}", f"dataset: {task}", f"fraction: {fraction}", f"mode: {mode}"]
    for f in dataclasses.fields(Recipe):
        value = getattr(r, f.name)
        lines.append(f"{f.name}: {'null' if value is None else value}")
    return "\n".join(lines) + "\n"


def load_preset(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preset YAML file -> (run keys: head/dataset/fraction/mode, recipe fields). Unknown keys are errors."""
    from ecamp.train.pretrain.config import read_yaml_mapping

    path = Path(path)
    data = schema_values(_Preset, read_yaml_mapping(path, "--config"), error=ConfigError, source=f"--config {path}",
                         path=path)
    run = {k: data[k] for k in _RUN_KEYS if k in data}
    return run, {k: v for k, v in data.items() if k not in _RUN_KEYS}
