"""Downstream classification: the authors' list files, label fractions, fine-tuning and linear probing.

List files (dossier 9.2): one line per image, ``<relative image path> <label_1> ... <label_C>`` separated by
spaces (a trailing space is allowed); multi-class tasks may also give a single class index. The train file is
``train_list_1.txt``, ``train_list_10.txt`` or ``train_list.txt`` for 1, 10 or 100 % of the labels; ``val_list.txt``
and ``test_list.txt`` complete the split. The authors' lists are files in their repository (``datasets/<task>/``);
point ``--lists`` at them. :func:`write_splits` writes seeded splits of your own where you have none.

Protocol fixes relative to the authors (dossier 12), on by default: the step budget is enforced and the schedule
clamped (#35), the scheduler steps after the optimizer (#36), the linear probe is a true one (frozen trunk in eval
mode, #39), and model selection never happens on the test set (#40). The mean AUROC is over the classes that have a
positive and a negative in the split (D15), computed on the logits (D16). The authors' CheXpert ``val_list.txt`` equals
its ``test_list.txt``; ecamp then tests on ``test_list_600.txt`` (the official CheXpert test images, in the same
folder of their repository) when it is there, and otherwise validates on a seeded 10 % of the training list.
``authors_protocol=True`` (``--authors-protocol``) keeps the authors' behaviour, for comparison with the paper;
each difference is also a named :class:`~ecamp.train.downstream.protocol.Protocol` option (``protocol=``).

Every path of the train, validation and test lists is checked before the model is built
(:func:`ecamp.train.common.lists.check_paths`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ecamp.config import EcampCfg, ecamp_cfg_of
from ecamp.errors import DataError, InvalidArgumentError
from ecamp.train.common.lists import check_paths, read_label_list
from ecamp.train.downstream.protocol import Protocol
from ecamp.train.downstream.recipes import Recipe
from ecamp.train.downstream.task import FinetuneRun, HeadTask, run_finetune

__all__ = ["TASKS", "Task", "read_list_file", "ListDataset", "split_indices", "write_splits", "select_validation",
           "undefined_auroc_classes", "refuse_undefined_auroc", "class_weights", "ClassificationTask",
           "finetune_classification", "export_classifier"]

logger = logging.getLogger("ecamp")


@dataclass(frozen=True)
class Task:
    num_classes: int
    multilabel: bool
    metric: str  # "auroc" (mean over classes) or "accuracy"
    labels: tuple[str, ...] = ()  # the list files' columns (class indices for multi-class tasks), in order


_NIH = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
TASKS: dict[str, Task] = {
    "chestx-ray14": Task(14, True, "auroc", _NIH),
    "chexpert": Task(5, True, "auroc", ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")),
    "rsna": Task(1, True, "auroc", ("Pneumonia",)),
    "covidx": Task(3, False, "accuracy", ("normal", "pneumonia", "COVID-19")),  # COVID-Net's class indices
    "aptos-2019": Task(5, False, "accuracy", ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")),
    # one-hot labels, evaluated as multi-label by the authors (#52)
    "odir-5k": Task(8, True, "auroc", ("Normal", "Diabetes", "Glaucoma", "Cataract", "AMD", "Hypertension",
                                       "Myopia", "Other")),
    "mured": Task(20, True, "auroc", ("DR", "NORMAL", "MH", "ODC", "TSLN", "ARMD", "DN", "MYA", "BRVO", "ODP",
                                      "CRVO", "CNV", "RS", "ODE", "LS", "CSR", "HTR", "ASR", "CRS", "OTHER")),
    "spinexr": Task(1, True, "auroc", ("abnormal",)),  # one 0/1 column; the authors' lists, no published settings
    # ecamp phantom --kind classification: ecamp.train.phantom.FINDINGS
    "phantom": Task(4, True, "auroc", ("effusion", "nodule", "cardiomegaly", "pneumothorax")),
}

def read_list_file(path: str | Path, task: Task) -> list[tuple[str, np.ndarray]]:
    """Rows of an authors'-format list file: (relative path, float labels [C] or class index [1])."""
    return read_label_list(path, task.num_classes, task.multilabel, missing_hint=(
        "download the authors' lists (their repository, datasets/<task>/) or write your own with "
        "ecamp.train.downstream.classification.write_splits"))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, image_root: str | Path, rows: list[tuple[str, np.ndarray]], transform: Any):
        self.root, self.rows, self.transform = Path(image_root), rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        name, y = self.rows[i]
        return self.transform(self.root / name), torch.from_numpy(y)


def split_indices(n: int, seed: int, n_test: int, n_val: int) -> dict[str, np.ndarray]:
    """A seeded permutation of ``n`` items cut into the authors' list stems: test, val, then train and its nested
    10 % and 1 % subsets (the 1 % images are part of the 10 %)."""
    order = np.random.default_rng(seed).permutation(n)
    train = order[n_test + n_val:]
    return {"test_list": order[:n_test], "val_list": order[n_test:n_test + n_val], "train_list": train,
            "train_list_10": train[: max(1, len(train) // 10)], "train_list_1": train[: max(1, len(train) // 100)]}


def write_splits(items: list[tuple[str, list[float]]], out_dir: str | Path, *, seed: int = 0, val: float = 0.1,
                 test: float = 0.2) -> dict[str, int]:
    """Seeded split into the authors' list files (:func:`split_indices`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(items)
    parts = split_indices(n, seed, int(round(n * test)), int(round(n * val)))
    for stem, idx in parts.items():
        lines = [" ".join([items[i][0], *[f"{v:g}" for v in items[i][1]]]) for i in idx]
        (out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return {f"{stem}.txt": len(idx) for stem, idx in parts.items()}


def select_validation(rows: dict[str, list], lists: Path, task_key: str, task: Task, *, authors: bool,
                      seed: int) -> tuple[dict[str, list], str]:
    """Keep model selection off the test set (dossier #40); returns the rows and a note on what was done."""
    if [r[0] for r in rows["val"]] != [r[0] for r in rows["test"]]:
        return rows, "val_list as validation, test_list as test"
    if authors:
        logger.warning("val_list equals test_list: model selection happens on the test set (authors' protocol).")
        return rows, "authors: val_list equals test_list; model selected on the test set"
    official = lists / "test_list_600.txt"
    if task_key == "chexpert" and official.is_file():
        return {**rows, "test": read_list_file(official, task)}, \
            "val_list (official CheXpert valid) as validation, test_list_600 (official CheXpert test) as test"
    train = rows["train"]
    if len(train) < 2:
        raise DataError("val_list equals test_list and the training list is too small to hold out a validation "
                        "set; pass --authors-protocol to select on the test set knowingly.", path=lists)
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, len(train) // 10)
    logger.warning("val_list equals test_list: validating on a seeded %d of the %d training images instead.",
                   n_val, len(train))
    return {**rows, "train": [train[i] for i in sorted(order[n_val:])],
            "val": [train[i] for i in sorted(order[:n_val])]}, \
        f"val_list equals test_list: a seeded 10 % of the training list ({n_val} images) as validation"


def _metric(task: Task, logits: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    if task.metric == "accuracy":
        return float((logits.argmax(1) == targets[:, 0]).mean()), []
    from sklearn.metrics import roc_auc_score

    per = []
    for c in range(task.num_classes):
        y = targets[:, c]
        per.append(float(roc_auc_score(y, logits[:, c])) if 0 < y.sum() < len(y) else float("nan"))
    return float(np.nanmean(per)), per


def undefined_auroc_classes(targets: np.ndarray) -> list[int]:
    """The classes whose AUROC is undefined on ``targets`` [N, C]: no positive, or no negative."""
    return [c for c in range(targets.shape[1]) if not 0 < targets[:, c].sum() < len(targets)]


def refuse_undefined_auroc(rows: dict[str, list], sources: dict[str, Path], task: Task) -> None:
    """``auroc_undefined_class="stop"`` (D15): refuse, before training, validation or test rows on which a class's
    AUROC is undefined, saying what the authors' code would have done with them."""
    for split, what in (("val", "validation"), ("test", "test")):
        if not rows[split]:
            continue
        bad = undefined_auroc_classes(np.stack([y for _, y in rows[split]]))
        if not bad:
            continue
        names = ", ".join(task.labels[c] if c < len(task.labels) else f"class {c}" for c in bad)
        then = ("at the first validation (Classification/train.py:477 -> :245 -> :69); with a later scikit-learn, "
                "which returns NaN, the mean is NaN, `best_auc <= nan` (:484) never saves a checkpoint and test() "
                "fails to load one" if split == "val" else
                "in test() after training (:337 -> :69); with a later scikit-learn the test AUROC is NaN")
        raise DataError(
            f"The {what} rows ({len(rows[split])}, from {sources[split]}) have no positive or no negative for "
            f"{names}: the authors' code averages AUROC over every class (Classification/train.py:65-71, :246), "
            f"and with their scikit-learn 1.3.2 roc_auc_score raises ValueError ('Only one class present in y_true') "
            f"{then}. Refused before training (auroc_undefined_class=stop, D15); pass --protocol-option "
            f"auroc_undefined_class=skip to leave such classes out of the mean, as ecamp does by default.",
            path=sources[split])


def export_classifier(model: nn.Module, folder: str | Path, *, label_names: list[str], multilabel: bool,
                      ecamp_cfg: EcampCfg | dict[str, Any] | None = None) -> dict:
    """Write a fine-tuned classifier as a timm-format folder (:func:`ecamp.save_pretrained`) that
    ``ecamp.load`` and transformers' ``TimmWrapper`` read: ``num_classes``, ``label_names`` and, in the ``ecamp``
    block, ``task``, ``activation`` (sigmoid for multi-label, softmax for multi-class) and ``ecamp_cfg``. A
    :class:`~ecamp.finetune.LinearProbe` is written as the timm model it equals: its encoder with the probe's
    linear head."""
    import copy

    from ecamp.finetune import LinearProbe
    from ecamp.folders import save_pretrained

    if isinstance(model, LinearProbe):
        probe, model = model, copy.deepcopy(model.encoder)
        model.reset_classifier(probe.head.out_features)
        model.head.load_state_dict(probe.head.state_dict())
        # not the base encoder's name
        model.ecamp_cfg = ecamp_cfg_of(probe) if getattr(probe, "ecamp_cfg", None) else ecamp_cfg_of(model)
    activation = "sigmoid" if multilabel else "softmax"
    if ecamp_cfg is None:  # the model's own block, told what it now is
        block = ecamp_cfg_of(model).replace(task="classification", activation=activation)
    else:  # the given block decides; multilabel fills in what it does not say
        block = EcampCfg.from_dict(ecamp_cfg)
        block = block.replace(task=block.task or "classification", activation=block.activation or activation)
    return save_pretrained(model, folder, label_names=label_names, ecamp_cfg=block)


def class_weights(option: str | Sequence[float] | None, train: list[tuple[str, np.ndarray]], task: Task
                  ) -> list[float] | None:
    """The loss weights of ``option``: ``"auto"`` gives, from the training rows, BCE's ``pos_weight`` per label
    (negatives / positives; multi-label) or cross-entropy's class weights (``N / (C * n_c)``; multi-class);
    explicit values are checked against the labels; None or ``"none"``: unweighted, as the authors."""
    if option is None or option == "none":
        return None
    which = "--pos-weight" if task.multilabel else "--class-weights"
    if option == "auto":
        y = np.stack([r for _, r in train])
        if task.multilabel:
            pos = y.sum(0)
            if (pos == 0).any():
                missing = [task.labels[c] if c < len(task.labels) else str(c) for c in np.nonzero(pos == 0)[0]]
                raise DataError(f"{which} auto: no training image is positive for {missing}; add positives or "
                                f"drop the label.")
            return [float(v) for v in (len(y) - pos) / pos]
        counts = np.bincount(y[:, 0].astype(int), minlength=task.num_classes)
        if (counts == 0).any():
            raise DataError(f"{which} auto: classes {np.nonzero(counts == 0)[0].tolist()} have no training image.")
        return [float(v) for v in len(y) / (task.num_classes * counts)]
    values = [float(v) for v in option]
    if len(values) != task.num_classes or not all(np.isfinite(v) and v > 0 for v in values):
        raise InvalidArgumentError(f"{which} takes auto, none or {task.num_classes} positive numbers, got {option!r}.")
    return values


class ClassificationTask(HeadTask):
    """Fine-tuning or linear probing of a classifier (:func:`finetune_classification`)."""

    head, suffix = "cls", ".txt"
    task_from_data: ClassVar[bool] = False  # the labels are known once the data is read (load_rows sets the task)

    def __init__(self, task_name: str, fraction: int, mode: str = "finetune", *, task: Task | None = None,
                 calibration: str = "auto", operating_point: str = "youden",
                 pos_weight: str | Sequence[float] | None = None,
                 class_weights: str | Sequence[float] | None = None):
        from ecamp.train.downstream.calibrate import CALIBRATION_CHOICES, parse_rule

        key = task_name.lower()
        if task is None and key not in TASKS and not self.task_from_data:
            raise InvalidArgumentError(f"Unknown task {task_name!r}; known: {sorted(TASKS)}, or --dataset custom for "
                                       f"your own data (docs/own-data.md).")
        if mode not in ("finetune", "linear-probe"):
            raise InvalidArgumentError(f"--mode must be finetune or linear-probe, got {mode!r}.")
        if calibration not in CALIBRATION_CHOICES:
            raise InvalidArgumentError(f"--calibration {calibration!r}: use one of {CALIBRATION_CHOICES}.")
        parse_rule(operating_point)
        super().__init__(key, fraction)
        self.mode, self.calibration, self.operating_point = mode, calibration, operating_point
        self.weight_options, self.class_weights = {"pos_weight": pos_weight, "class_weights": class_weights}, None
        if not self.task_from_data:
            self.set_task(task or TASKS[key])
        self.sigmoid_scores = False  # D16, set by prepare_rows from the run's protocol

    def set_task(self, task: Task) -> None:
        """The labels this run learns (a custom task knows them once its data is read)."""
        if self.calibration == "platt" and not task.multilabel:
            raise InvalidArgumentError("--calibration platt is for multi-label (sigmoid) heads; this task is "
                                       "multi-class: use --calibration temperature or auto.")
        wrong = "class_weights" if task.multilabel else "pos_weight"
        if self.weight_options[wrong] not in (None, "none"):
            right = "--pos-weight" if task.multilabel else "--class-weights"
            kind = "multi-label" if task.multilabel else "multi-class"
            raise InvalidArgumentError(f"--{wrong.replace('_', '-')} does not apply: this task is {kind}; use "
                                       f"{right}.")
        self.task, self.metric = task, task.metric

    @property
    def desc(self) -> str:
        return f"{self.mode} {self.key} {self.fraction}%"

    def default_recipe(self) -> Recipe:
        from ecamp.train.downstream.recipes import recipe

        return recipe("cls", self.key, self.fraction, self.mode)

    def read_list(self, path: Path) -> list[tuple[str, np.ndarray]]:
        return read_list_file(path, self.task)

    def prepare_rows(self, run: FinetuneRun) -> dict[str, list]:
        listed_test = run.rows["test"]
        rows, self.note = select_validation(run.rows, run.lists, self.key, self.task,
                                            authors=run.protocol.select_on_test, seed=run.seed)
        if rows["test"] is not listed_test:  # CheXpert's official test list replaced it
            check_paths({run.lists / "test_list_600.txt": [name for name, _ in rows["test"]]}, run.data_root)
        if self.task.metric == "auroc" and run.protocol.auroc_undefined_class == "stop":
            sources = {"val": run.files["val"] if rows["val"] is run.rows["val"] else run.files["train"],
                       "test": run.files["test"] if rows["test"] is listed_test else run.lists / "test_list_600.txt"}
            refuse_undefined_auroc(rows, sources, self.task)
        self.sigmoid_scores = self.task.multilabel and run.protocol.auroc_scores == "sigmoid-fp32"
        option = self.weight_options["pos_weight" if self.task.multilabel else "class_weights"]
        self.class_weights = class_weights(option, rows["train"], self.task)
        return rows

    def build_model(self, run: FinetuneRun) -> nn.Module:
        import ecamp
        from ecamp.finetune import LinearProbe

        proto, task = run.protocol, self.task
        if self.mode == "finetune" or proto.lp_head in ("authors", "full-finetune"):
            # the authors' classifier: fresh fc_norm over the mean patch token, drop-path 0.1, head std 2e-5
            model = ecamp.load(run.model_name, num_classes=task.num_classes, fc_norm=True, drop_path_rate=0.1)
            nn.init.trunc_normal_(model.head.weight, std=2e-5)
            if self.mode == "linear-probe" and proto.lp_head == "authors":  # their --mode LinearProbe (#39)
                for name, p in model.named_parameters():
                    p.requires_grad_(name.startswith("head"))
            self.trunk = model
        else:
            model = LinearProbe(ecamp.load(run.model_name), task.num_classes)
            self.trunk = model.encoder
        return model

    def datasets(self, run: FinetuneRun) -> dict[str, torch.utils.data.Dataset]:
        import ecamp

        tf_train, tf_eval = ecamp.get_transform(self.trunk, train=True), ecamp.get_transform(self.trunk)
        return {s: ListDataset(run.data_root, run.rows[s], tf_train if s == "train" else tf_eval) for s in run.rows}

    def describe(self, model: nn.Module, run: FinetuneRun) -> None:
        from ecamp.train.downstream.loop import finetuned_block

        task = self.task
        self.labels = self.labels_of()
        self.block = block = finetuned_block(self.trunk, run.model_name,
                                             {"dataset": self.key, "fraction": self.fraction, "mode": self.mode})
        model.label_names = self.labels
        model.ecamp_cfg = block.replace(task="classification", activation="sigmoid" if task.multilabel else "softmax")

    def train_loss(self, net: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, y = batch
        w = None if self.class_weights is None else torch.tensor(self.class_weights, device=device)
        if self.task.multilabel:  # BCE, positives weighted by pos_weight
            return nn.functional.binary_cross_entropy_with_logits(net(x.to(device)), y.to(device), pos_weight=w)
        return nn.functional.cross_entropy(net(x.to(device)), y[:, 0].long().to(device), weight=w)

    def predict(self, net: nn.Module, batch: Any, device: torch.device) -> list:
        x, y = batch
        out = net(x.to(device)).float()
        if self.sigmoid_scores:  # D16: the authors score float32 sigmoid probabilities
            out = out.sigmoid()
        return list(zip(out.cpu(), y, strict=True))

    def score(self, outputs: list) -> tuple[float, list[float]]:
        return _metric(self.task, torch.stack([p for p, _ in outputs]).numpy(),
                       torch.stack([t for _, t in outputs]).numpy())

    def val_value(self, scored: tuple[float, list[float]]) -> float:
        return scored[0]

    def export(self, model: nn.Module, folder: Path, info: dict[str, Any]) -> None:
        block = self.block
        export_classifier(model, folder, label_names=self.labels, multilabel=self.task.multilabel,
                          ecamp_cfg=block.replace(finetune={**block.finetune, **info}))

    def protocol_note(self, run: FinetuneRun) -> str:
        return self.note

    def metrics_fields(self, run: FinetuneRun) -> dict[str, Any]:
        fields: dict[str, Any] = {"mode": self.mode}
        if self.class_weights is not None:
            fields["pos_weight" if self.task.multilabel else "class_weights"] = dict(
                zip(self.labels_of(), self.class_weights, strict=True))
        return fields

    def labels_of(self) -> list[str]:
        return list(self.task.labels) or [f"class_{c}" for c in range(self.task.num_classes)]

    def test_fields(self, scored: tuple[float, list[float]]) -> dict[str, Any]:
        test, per = scored
        return {f"test_{self.metric}": test, "test_per_class": per}

    def finish(self, model: nn.Module, run: FinetuneRun, outputs, summary: dict[str, Any],
               output_dir: Path) -> dict[str, Any]:
        """Fit the calibration and the operating points on the validation split, score them on validation and
        test, write them into ``best/config.json`` and draw the test split's reliability diagram."""
        from ecamp.train.downstream.calibrate import finish_classifier

        return finish_classifier(self, model, run, outputs, summary, output_dir)


def finetune_classification(task_name: str, fraction: int, data_root: str | Path, output_dir: str | Path, *,
                            model_name: str = "cxr-vit-b", lists: str | Path | None = None, mode: str = "finetune",
                            recipe: Recipe | None = None, authors_protocol: bool = False, num_workers: int = 4,
                            device: str | None = None, seed: int = 42, progress: bool = True,
                            deterministic: bool = False,
                            protocol: Protocol | dict[str, Any] | None = None, calibration: str = "auto",
                            operating_point: str = "youden", pos_weight: str | Sequence[float] | None = None,
                            class_weights: str | Sequence[float] | None = None) -> dict[str, Any]:
    """Fine-tune (or linear-probe) an encoder on a classification task; writes ``metrics.json`` in
    ``output_dir`` with the validation and test metric by name. ``recipe`` defaults to the authors' row
    (:func:`ecamp.train.downstream.recipes.recipe`): SGD momentum 0.9, linear warm-up then cosine, gradient
    clipping at 1.0, validation every epoch, best checkpoint by the validation metric, early stopping after 20
    evaluations. ``protocol``: a :class:`Protocol`, or option overrides on top of ecamp's (or, with
    ``authors_protocol``, the authors') protocol. The best model is written to ``output_dir/best``
    (:func:`export_classifier`), which ``ecamp.load("local-dir:OUTPUT_DIR/best")`` and ``ecamp predict`` read,
    with the ``calibration`` (auto, temperature, platt, none) and the ``operating_point`` rule's thresholds
    fitted on the validation split (:mod:`~ecamp.train.downstream.calibrate`). ``pos_weight`` (multi-label) and
    ``class_weights`` (multi-class): ``"auto"`` weights the loss by the training frequencies
    (:func:`class_weights`). Your own data: :func:`ecamp.train.downstream.custom.finetune_custom`."""
    head = ClassificationTask(task_name, fraction, mode, calibration=calibration, operating_point=operating_point,
                              pos_weight=pos_weight, class_weights=class_weights)
    return run_finetune(head, data_root, output_dir, model_name=model_name,
                        lists=lists, recipe=recipe, authors_protocol=authors_protocol, num_workers=num_workers,
                        device=device, seed=seed, progress=progress, deterministic=deterministic,
                        protocol=protocol)
