"""One fine-tuning run, whatever the head: :class:`HeadTask` is what a head supplies, :func:`run_finetune` the steps
every head shares.

The runner resolves the protocol and the recipe, reads the train, validation and test lists and checks every path
they name before anything is built, sets up the runtime (process group, device, seed), then asks the head for its
model, data sets and ``ecamp`` block, trains it with :func:`~ecamp.train.downstream.loop.train_head`, tests the
best weights, lets the head finish (a classifier fits its calibration and operating points) and writes
``metrics.json``. A head fills in only what differs: how its lists read, its model, data
sets, loss, predictions, score and export (:mod:`~ecamp.train.downstream.classification`,
:mod:`~ecamp.train.downstream.segmentation`, :mod:`~ecamp.train.downstream.detection`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ecamp.train.common.distributed import Runtime, setup_runtime
from ecamp.train.common.lists import check_paths, list_file_for
from ecamp.train.downstream.loop import evaluate, train_head, write_metrics
from ecamp.train.downstream.protocol import Protocol, resolve_protocol
from ecamp.train.downstream.recipes import Recipe

__all__ = ["HeadTask", "FinetuneRun", "run_finetune", "SPLITS"]

SPLITS = ("train", "val", "test")
# the order of metrics.json's leading fields, each head's own among them; the summary and test scores follow
_FIELDS = ("task", "fraction", "mode", "model", "decoder", "steps", "expansion", "protocol", "protocol_options",
           "precision", "deterministic", "train_images")


@dataclass
class FinetuneRun:
    """What the runner has settled when it asks the head to build: the run's options, its protocol and recipe,
    the list files and their rows by split, and the runtime."""

    model_name: str
    data_root: Path
    lists: Path
    authors_protocol: bool
    protocol: Protocol
    recipe: Recipe
    seed: int
    files: dict[str, Path]
    rows: dict[str, list]
    runtime: Runtime
    output_dir: Path | None = None


class HeadTask(ABC):
    """One downstream head's part of a fine-tuning run on data set ``key`` with ``fraction`` % of the labels.

    Required: :meth:`default_recipe`, :meth:`read_list`, :meth:`build_model`, :meth:`datasets`, :meth:`describe`,
    :meth:`train_loss`, :meth:`predict`, :meth:`score` and :meth:`export`. The other methods have the common
    behaviour and are overridden where a head differs. An instance serves one run: what :meth:`build_model` makes is
    kept on it for the later steps.
    """

    head: ClassVar[str]  # "cls", "seg" or "det": the recipe table, and the progress label of the dense heads
    suffix: ClassVar[str] = ".csv"  # of the list files
    collate_fn: ClassVar[Callable | None] = None  # of the training and evaluation loaders
    metric: str  # the validation metric's name (higher is better): metrics.json's val_<metric>, test_<metric>

    def __init__(self, key: str, fraction: int):
        self.key, self.fraction = key, fraction

    @property
    def desc(self) -> str:
        """The progress bar's label."""
        return f"{self.head} {self.key} {self.fraction}%"

    # -- the lists ------------------------------------------------------------------------------------------------
    def check_lists(self, lists: Path) -> None:
        """Refuse a lists folder this head cannot read, before anything else is done (default: nothing to check)."""
        return None

    @abstractmethod
    def default_recipe(self) -> Recipe:
        """The authors' row of this head, data set and fraction (:func:`~ecamp.train.downstream.recipes.recipe`)."""

    def list_files(self, lists: Path, protocol: Protocol) -> dict[str, Path]:
        """The list file of each split (default: the authors' names for :data:`SPLITS`)."""
        return {s: lists / list_file_for(s, self.fraction, suffix=self.suffix) for s in SPLITS}

    @abstractmethod
    def read_list(self, path: Path) -> list:
        """The rows of one list file."""

    def list_paths(self, rows: list) -> list:
        """What :func:`~ecamp.train.common.lists.check_paths` checks of each row (default: its first field)."""
        return [row[0] for row in rows]

    def load_rows(self, lists: Path, protocol: Protocol) -> tuple[dict[str, Path], dict[str, list]]:
        """The source and the rows of each split (default: :meth:`list_files`, each read by :meth:`read_list`)."""
        files = self.list_files(lists, protocol)
        return files, {s: self.read_list(files[s]) for s in files}

    def check_rows(self, files: dict[str, Path], rows: dict[str, list], data_root: Path) -> None:
        """Refuse rows naming no file under ``data_root``, before anything is built (default:
        :func:`~ecamp.train.common.lists.check_paths` on :meth:`list_paths`)."""
        check_paths({files[s]: self.list_paths(rows[s]) for s in files}, data_root)

    def prepare_rows(self, run: FinetuneRun) -> dict[str, list]:
        """The rows the run trains, validates and tests on, once the runtime is set up (default: as listed)."""
        return run.rows

    # -- the model and its data -----------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, run: FinetuneRun) -> nn.Module:
        """The model to train, its trainable parameters marked."""

    @abstractmethod
    def datasets(self, run: FinetuneRun) -> dict[str, torch.utils.data.Dataset]:
        """A data set per split of ``run.rows``."""

    @abstractmethod
    def describe(self, model: nn.Module, run: FinetuneRun) -> None:
        """Give ``model`` its ``label_names`` and ``ecamp_cfg`` (the ``ecamp`` block its exports carry)."""

    @abstractmethod
    def train_loss(self, net: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The training loss of a batch (``net`` may be wrapped in DDP)."""

    @abstractmethod
    def predict(self, net: nn.Module, batch: Any, device: torch.device) -> list:
        """One entry per sample of an evaluation batch, on the CPU (:func:`~ecamp.train.downstream.loop.evaluate`)."""

    @abstractmethod
    def score(self, outputs: list) -> Any:
        """The score of all predictions of a split, in no particular order."""

    def val_value(self, scored: Any) -> float:
        """The number model selection compares, from :meth:`score` (default: the score itself)."""
        return scored

    @abstractmethod
    def export(self, model: nn.Module, folder: Path, info: dict[str, Any]) -> None:
        """Write the model into ``folder`` (``best/``); ``info`` holds the step and validation score."""

    # -- metrics.json ---------------------------------------------------------------------------------------------
    @abstractmethod
    def protocol_note(self, run: FinetuneRun) -> str:
        """metrics.json's ``protocol``: which protocol ran, and what the head did about its test set."""

    def metrics_fields(self, run: FinetuneRun) -> dict[str, Any]:
        """The head's own leading fields of metrics.json (default: none)."""
        return {}

    def test_fields(self, scored: Any) -> dict[str, Any]:
        """metrics.json's test scores (default: ``test_<metric>``)."""
        return {f"test_{self.metric}": scored}

    def finish(self, model: nn.Module, run: FinetuneRun, outputs: Callable[[str, Callable], list],
               summary: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        """After the test, with the best weights loaded: more metrics.json fields; may rewrite ``best/`` (default:
        nothing). ``outputs(split, fn)`` gathers ``fn(net, batch, device)``'s entries over a split."""
        return {}


def run_finetune(head: HeadTask, data_root: str | Path, output_dir: str | Path, *, model_name: str = "cxr-vit-b",
                 lists: str | Path | None = None, recipe: Recipe | None = None, authors_protocol: bool = False,
                 num_workers: int = 4, device: str | None = None, seed: int = 42, progress: bool = True,
                 deterministic: bool = False, protocol: Protocol | Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Train ``head`` (the module docstring has the steps); returns the metrics, also written to
    ``output_dir/metrics.json``, and leaves the best model in ``output_dir/best``. The options are those of
    ``finetune_classification``, ``finetune_segmentation`` and ``finetune_detection``."""
    lists_dir = Path(lists or data_root)
    head.check_lists(lists_dir)
    proto = resolve_protocol(protocol, authors_protocol, head.metric)
    r = proto.recipe(recipe or head.default_recipe())
    files, rows = head.load_rows(lists_dir, proto)
    head.check_rows(files, rows, Path(data_root))
    rt = setup_runtime(device, seed=seed, deterministic=deterministic)
    run = FinetuneRun(model_name, Path(data_root), lists_dir, authors_protocol, proto, r, seed, files, rows, rt,
                      Path(output_dir))
    run.rows = head.prepare_rows(run)
    model = head.build_model(run)
    sets = head.datasets(run)
    head.describe(model, run)

    def run_eval(split: str) -> Any:
        return evaluate(model, sets[split], lambda net, batch: head.predict(net, batch, rt.device), head.score, rt,
                        batch_size=r.eval_batch_size, num_workers=num_workers, collate_fn=head.collate_fn)

    summary = train_head(model, sets["train"], head.train_loss, lambda: head.val_value(run_eval("val")), r, rt,
                         output_dir, metric=head.metric, num_workers=num_workers, collate_fn=head.collate_fn,
                         seed=seed, progress=progress, desc=head.desc, protocol=proto, export=head.export)
    test = run_eval("test")

    def outputs(split: str, fn: Callable) -> list:
        return evaluate(model, sets[split], lambda net, batch: fn(net, batch, rt.device), lambda o: o, rt,
                        batch_size=r.eval_batch_size, num_workers=num_workers, collate_fn=head.collate_fn)

    finished = head.finish(model, run, outputs, summary, Path(output_dir))
    fields = {"task": head.key, "fraction": head.fraction, "model": model_name, "steps": r.steps,
              "protocol": head.protocol_note(run), "protocol_options": proto.as_dict(), "precision": r.precision,
              "deterministic": deterministic, **head.metrics_fields(run)}
    order = [k for k in _FIELDS if k in fields] + [k for k in fields if k not in _FIELDS]
    metrics = {**{k: fields[k] for k in order}, **summary, **head.test_fields(test), **finished}
    write_metrics(rt, output_dir, metrics)
    return metrics
