"""The metrics log of a run: ``metrics.jsonl`` (one JSON line per entry) plus an optional CSV or TensorBoard sink.

Only the main process writes. On resume the JSONL is cut back to the checkpoint's step and the CSV is written
again from it, so both hold each step exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecamp.errors import MissingDependencyError

__all__ = ["MetricsLog"]


class MetricsLog:
    """Append rows to ``folder/metrics.jsonl``; ``sink`` adds ``metrics.csv`` (columns ``csv_columns``) or a
    TensorBoard event file (scalars ``csv_columns`` minus ``step``)."""

    def __init__(self, folder: str | Path, *, enabled: bool = True, sink: str | None = None,
                 columns: Sequence[str] = (), resume_step: int | None = None, fresh: bool = False):
        self.enabled, self.columns = enabled, tuple(columns)
        self._jsonl = self._csv = self._tb = None
        if not enabled:
            return
        folder = Path(folder)
        jsonl = folder / "metrics.jsonl"
        if resume_step is not None and jsonl.is_file():  # drop lines written after that checkpoint
            kept = [ln for ln in jsonl.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            jsonl.write_text("".join(ln + "\n" for ln in kept))
        self._jsonl = open(jsonl, "w" if fresh else "a", encoding="utf-8")
        if sink == "csv":
            path = folder / "metrics.csv"
            rebuild = not path.is_file() or resume_step is not None
            self._csv = open(path, "w" if rebuild else "a", encoding="utf-8")
            if rebuild:
                self._csv.write(",".join(self.columns) + "\n")
                if resume_step is not None:
                    for ln in jsonl.read_text().splitlines():
                        self._write_csv(json.loads(ln))
        elif sink == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MissingDependencyError("run.log=tensorboard needs TensorBoard: pip install tensorboard") from e
            self._tb = SummaryWriter(str(folder / "tensorboard"))

    def _write_csv(self, row: dict[str, Any]) -> None:
        self._csv.write(",".join(str(row[k]) for k in self.columns) + "\n")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._csv:
            self._write_csv(row)
            self._csv.flush()
        if self._tb:
            for k in self.columns:
                if k != "step":
                    self._tb.add_scalar(k, row[k], row["step"])

    def close(self) -> None:
        for f in (self._jsonl, self._csv, self._tb):
            if f is not None:
                f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
