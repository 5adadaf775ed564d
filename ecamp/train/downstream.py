"""Downstream classification: the authors' list files, label fractions, recipes, fine-tuning and linear probing.

List files (dossier 9.2): one line per image, ``<relative image path> <label_1> ... <label_C>`` separated by
spaces (a trailing space is allowed); multi-class tasks may also give a single class index. The train file is
``train_list_1.txt``, ``train_list_10.txt`` or ``train_list.txt`` for 1, 10 or 100 % of the labels; ``val_list.txt``
and ``test_list.txt`` complete the split. The authors' lists are files in their repository (``datasets/<task>/``);
point ``--lists`` at them. :func:`write_splits` writes seeded splits of your own where you have none.

Protocol fixes relative to the authors (dossier 12), on by default: the step budget is enforced and the schedule
clamped (#35), the scheduler steps after the optimizer (#36), the linear probe is a true one (frozen trunk in eval
mode, #39). CheXpert's validation list equals its test list in the authors' repository (#40): ecamp warns when
val and test lists are identical, because model selection then happens on the test set.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import EcampError
from ..fileio import atomic_write
from .data import DataError

__all__ = ["TASKS", "AUTHORS_RECIPES", "Task", "read_list_file", "list_file_for", "ListDataset", "write_splits",
           "finetune_classification"]

logger = logging.getLogger("ecamp")


@dataclass(frozen=True)
class Task:
    num_classes: int
    multilabel: bool
    metric: str  # "auroc" (mean over classes) or "accuracy"


TASKS: dict[str, Task] = {
    "chestx-ray14": Task(14, True, "auroc"),
    "chexpert": Task(5, True, "auroc"),
    "rsna": Task(1, True, "auroc"),
    "covidx": Task(3, False, "accuracy"),
    "aptos-2019": Task(5, False, "accuracy"),
    "odir-5k": Task(8, True, "auroc"),  # one-hot labels, evaluated as multi-label by the authors (#52)
    "mured": Task(20, True, "auroc"),
    "phantom": Task(4, True, "auroc"),  # ecamp phantom --kind classification
}

# run_ft.sh / run_lp.sh (dossier 9.2): (steps, lr, warmup, batch) per task and label percentage; the authors gave
# none for the fundus tasks, so those use the ChestX-ray14 row of the same percentage (our choice).
AUTHORS_RECIPES: dict[tuple[str, int, str], tuple[int, float, int, int]] = {
    ("chestx-ray14", 1, "finetune"): (3000, 3e-2, 50, 96), ("chestx-ray14", 10, "finetune"): (3000, 2.4e-2, 50, 768),
    ("chestx-ray14", 100, "finetune"): (30000, 1e-2, 500, 768),
    ("chestx-ray14", 1, "linear-probe"): (3000, 3e-2, 50, 96),
    ("chestx-ray14", 10, "linear-probe"): (30000, 2.4e-2, 50, 768),
    ("chestx-ray14", 100, "linear-probe"): (30000, 1e-2, 500, 768),
    ("chexpert", 1, "finetune"): (30000, 3e-3, 50, 768), ("chexpert", 10, "finetune"): (90000, 5e-3, 1500, 768),
    ("chexpert", 100, "finetune"): (90000, 4e-3, 1500, 768),
    ("chexpert", 1, "linear-probe"): (9000, 3e-3, 150, 768), ("chexpert", 10, "linear-probe"): (9000, 3e-2, 1500, 1024),
    ("chexpert", 100, "linear-probe"): (22500, 3e-2, 3750, 4096),
    ("rsna", 1, "finetune"): (2000, 3e-3, 50, 256), ("rsna", 10, "finetune"): (9000, 3e-3, 50, 768),
    ("rsna", 100, "finetune"): (90000, 3e-3, 150, 768),
    ("rsna", 1, "linear-probe"): (1000, 1e-2, 50, 96), ("rsna", 10, "linear-probe"): (5000, 1e-2, 50, 768),
    ("rsna", 100, "linear-probe"): (9000, 1e-2, 150, 4096),
    ("covidx", 1, "finetune"): (30000, 3e-2, 50, 256), ("covidx", 10, "finetune"): (30000, 1e-2, 50, 768),
    ("covidx", 100, "finetune"): (30000, 1e-2, 50, 768),
    ("covidx", 1, "linear-probe"): (500, 3e-2, 30, 128), ("covidx", 10, "linear-probe"): (5000, 3e-2, 350, 128),
    ("covidx", 100, "linear-probe"): (9000, 3e-2, 1750, 256),
}


def recipe(task: str, fraction: int, mode: str) -> tuple[int, float, int, int]:
    key = (task, fraction, mode)
    if key in AUTHORS_RECIPES:
        return AUTHORS_RECIPES[key]
    return AUTHORS_RECIPES[("chestx-ray14", fraction, mode)]


def list_file_for(split: str, fraction: int = 100, suffix: str = ".txt") -> str:
    """The authors' list-file name: ``train_list{,_1,_10}``, ``val_list`` or ``test_list`` plus ``suffix``."""
    if split == "train":
        if fraction not in (1, 10, 100):
            raise EcampError(f"--fraction must be 1, 10 or 100, got {fraction}.")
        return ("train_list" if fraction == 100 else f"train_list_{fraction}") + suffix
    if split not in ("val", "test"):
        raise EcampError(f"Unknown split {split!r}.")
    return f"{split}_list{suffix}"


def warmup_cosine(warmup: int, total: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then a cosine to 0 at ``total``, clamped there (the
    authors' schedule rose again past the end, #35)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def read_list_file(path: str | Path, task: Task) -> list[tuple[str, np.ndarray]]:
    """Rows of an authors'-format list file: (relative path, float labels [C] or class index [1])."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"List file {path} does not exist; download the authors' lists (their repository, "
                        f"datasets/<task>/) or write your own with ecamp.train.downstream.write_splits.")
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        name, labels = parts[0], parts[1:]
        try:
            values = np.array([float(v) for v in labels], dtype=np.float32)
        except ValueError as e:
            raise DataError(f"{path}:{k}: labels must be numbers: {line!r}") from e
        if task.multilabel:
            if len(values) != task.num_classes:
                raise DataError(f"{path}:{k}: expected {task.num_classes} labels, got {len(values)}: {line!r}")
        elif len(values) == task.num_classes and task.num_classes > 1:
            values = np.array([float(np.argmax(values))], dtype=np.float32)
        elif len(values) != 1 or not 0 <= values[0] < task.num_classes:
            raise DataError(f"{path}:{k}: expected a class index in 0..{task.num_classes - 1} or "
                            f"{task.num_classes} one-hot labels: {line!r}")
        rows.append((name, values))
    if not rows:
        raise DataError(f"List file {path} is empty.")
    return rows


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, image_root: str | Path, rows: list[tuple[str, np.ndarray]], transform: Any):
        self.root, self.rows, self.transform = Path(image_root), rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        name, y = self.rows[i]
        return self.transform(self.root / name), torch.from_numpy(y)


def write_splits(items: list[tuple[str, list[float]]], out_dir: str | Path, *, seed: int = 0, val: float = 0.1,
                 test: float = 0.2) -> dict[str, int]:
    """Seeded split into the authors' list files: test and val first, then the train list and its 10 % and 1 %
    subsets (nested: the 1 % images are part of the 10 %)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(items))
    n_test, n_val = int(round(len(items) * test)), int(round(len(items) * val))
    parts = {"test_list.txt": order[:n_test], "val_list.txt": order[n_test:n_test + n_val]}
    train = order[n_test + n_val:]
    parts["train_list.txt"] = train
    parts["train_list_10.txt"] = train[: max(1, len(train) // 10)]
    parts["train_list_1.txt"] = train[: max(1, len(train) // 100)]
    for name, idx in parts.items():
        lines = [" ".join([items[i][0], *[f"{v:g}" for v in items[i][1]]]) for i in idx]
        (out / name).write_text("\n".join(lines) + "\n")
    return {k: len(v) for k, v in parts.items()}


def _metric(task: Task, logits: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    if task.metric == "accuracy":
        return float((logits.argmax(1) == targets[:, 0]).mean()), []
    from sklearn.metrics import roc_auc_score

    per = []
    for c in range(task.num_classes):
        y = targets[:, c]
        per.append(float(roc_auc_score(y, logits[:, c])) if 0 < y.sum() < len(y) else float("nan"))
    return float(np.nanmean(per)), per


@torch.no_grad()
def _evaluate(model, loader, task: Task, device) -> tuple[float, list[float]]:
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        ys.append(y)
    return _metric(task, torch.cat(outs).numpy(), torch.cat(ys).numpy())


def finetune_classification(task_name: str, fraction: int, data_root: str | Path, output_dir: str | Path, *,
                            model_name: str = "cxr-vit-b", lists: str | Path | None = None, mode: str = "finetune",
                            max_steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
                            warmup: int | None = None, eval_every: int | None = None, num_workers: int = 4,
                            device: str | None = None, seed: int = 42, progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or linear-probe) an encoder on a classification task; writes ``metrics.json`` in
    ``output_dir`` with the validation and test metric by name. SGD momentum 0.9, linear warm-up then cosine,
    gradient clipping at 1.0, best checkpoint by the validation metric, as the authors."""
    import ecamp

    from ..finetune import LinearProbe

    key = task_name.lower()
    if key not in TASKS:
        raise EcampError(f"Unknown task {task_name!r}; known: {sorted(TASKS)}.")
    if mode not in ("finetune", "linear-probe"):
        raise EcampError(f"--mode must be finetune or linear-probe, got {mode!r}.")
    task = TASKS[key]
    steps, r_lr, r_warm, r_bs = recipe(key, fraction, mode)
    steps = min(steps, max_steps) if max_steps else steps
    lr, batch_size = lr or r_lr, batch_size or r_bs
    warmup = r_warm if warmup is None else warmup
    torch.manual_seed(seed)
    lists = Path(lists or data_root)
    rows = {s: read_list_file(lists / list_file_for(s, fraction), task) for s in ("train", "val", "test")}
    if [r[0] for r in rows["val"]] == [r[0] for r in rows["test"]]:
        logger.warning("val_list.txt equals test_list.txt: model selection happens on the test set (the authors' "
                       "CheXpert lists do this); report such numbers as upstream-protocol numbers.")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if mode == "finetune":
        model = ecamp.load(model_name, num_classes=task.num_classes, fc_norm=True, drop_path_rate=0.1)
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # the authors' head init
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model = LinearProbe(ecamp.load(model_name), task.num_classes)
        params = list(model.head.parameters())
    model.to(dev)
    tf_train = ecamp.get_transform(model.encoder if mode != "finetune" else model, train=True)
    tf_eval = ecamp.get_transform(model.encoder if mode != "finetune" else model)
    g = torch.Generator().manual_seed(seed)
    loaders = {
        "train": torch.utils.data.DataLoader(ListDataset(data_root, rows["train"], tf_train), batch_size=batch_size,
                                             shuffle=True, drop_last=len(rows["train"]) > batch_size,
                                             num_workers=num_workers, generator=g),
        "val": torch.utils.data.DataLoader(ListDataset(data_root, rows["val"], tf_eval), batch_size=256,
                                           num_workers=num_workers),
        "test": torch.utils.data.DataLoader(ListDataset(data_root, rows["test"], tf_eval), batch_size=256,
                                            num_workers=num_workers),
    }
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    loss_fn = nn.BCEWithLogitsLoss() if task.multilabel else nn.CrossEntropyLoss()
    eval_every = eval_every or max(1, len(loaders["train"]))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    best, best_state, step = -1.0, None, 0
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"{mode} {key} {fraction}%", disable=not progress)
    while step < steps:
        for x, y in loaders["train"]:
            model.train()
            logits = model(x.to(dev))
            target = y.to(dev) if task.multilabel else y[:, 0].long().to(dev)
            loss = loss_fn(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()  # after the optimizer (the authors' order was reversed, #36)
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                val, _ = _evaluate(model, loaders["val"], task, dev)
                if val >= best:
                    best = val
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step >= steps:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    test, per = _evaluate(model, loaders["test"], task, dev)
    metrics = {"task": key, "fraction": fraction, "mode": mode, "model": model_name, "steps": steps,
               f"val_{task.metric}": best, f"test_{task.metric}": test, "test_per_class": per}
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    return metrics
