"""The batch machinery that embedding, prediction and training share: one DataLoader runner over inputs that may
fail to read, one autocast spelling, one copy-ahead to the device and one fill of the rows a run could not read.

Kept apart from :mod:`ecamp.embedding` so that prediction and the training loops read images exactly as
``ecamp embed`` does without importing the embedding code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import EcampError

__all__ = ["load_batches", "autocast", "prefetched", "collect_rows"]


class _Images(torch.utils.data.Dataset):
    """Item i -> (i, tensor or None, error message or None); decoding errors stay per item."""

    def __init__(self, inputs: Sequence[Any], transform: Callable[[Any], Any]):
        self.inputs = inputs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(self.inputs[i]), None
        except EcampError as e:
            return i, None, str(e)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - one bad input must never stop a run
            return i, None, f"{str(self.inputs[i])[:200]}: {type(e).__name__}: {e}"


def _collate(items):
    return items


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of ``dtype`` on ``device``; none for ``None`` or float32, so one call site serves
    every precision."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_batches(inputs: Sequence[Any], transform: Callable[[Any], Any], *, batch_size: int, num_workers: int = 0,
                 progress: bool = True, desc: str = "embed", pin_memory: bool = False):
    """Yield ``(ok [(index, transform(input))], failures {index: message})`` per batch, in input order, decoded by
    DataLoader workers under a progress bar; an input that cannot be read is a failure, never an exception.
    ``pin_memory``: the batches' tensors come in page-locked memory (for non-blocking copies to a GPU)."""
    from .console import progress_bar

    loader = torch.utils.data.DataLoader(_Images(inputs, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate,
                                         persistent_workers=False, pin_memory=pin_memory)
    bar = progress_bar(total=len(inputs), desc=desc, unit="img", disable=not progress)
    try:
        for items in loader:
            yield [(i, x) for i, x, err in items if x is not None], {i: err for i, x, err in items if x is None}
            bar.update(len(items))
    finally:
        bar.close()


def prefetched(batches: Iterable[tuple[list, dict[int, str]]], device: torch.device) -> Iterator[tuple[list, dict]]:
    """:func:`load_batches`' batches with their decoded items (objects whose tensors are attributes) moved to
    ``device``. On CUDA the next batch's copies (from pinned memory) are issued on a side stream before the current
    batch is handed out, so that they overlap its compute."""
    def move(batch):
        ok, failures = batch
        return [(i, x.to(device, non_blocking=True)) for i, x in ok], failures

    if device.type != "cuda":
        yield from map(move, batches)
        return
    stream, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(batch):
        with torch.cuda.stream(stream):
            return move(batch)

    batches = iter(batches)
    nxt = next(batches, None)
    ready = None if nxt is None else issue(nxt)
    while ready is not None:
        current.wait_stream(stream)
        for _, x in ready[0]:  # made on the side stream, used on this one: the allocator must not reuse them early
            for t in vars(x).values():
                if isinstance(t, torch.Tensor):
                    t.record_stream(current)
        nxt = next(batches, None)
        batch, ready = ready, None if nxt is None else issue(nxt)
        yield batch


def collect_rows(batches: Iterable[tuple[Sequence[int], np.ndarray, dict[int, str]]], n: int
                 ) -> tuple[np.ndarray | None, dict[int, str]]:
    """Join ``(indices, rows [b, D], failures)`` batches into ``[n, D]`` float32 rows and all failures; the row of
    an input that could not be read is NaN, so row i stays input i. The rows are None when no input was read (the
    width is unknown then)."""
    rows: np.ndarray | None = None
    failures: dict[int, str] = {}
    for idx, out, failed in batches:
        failures.update(failed)
        if len(idx):
            if rows is None:
                rows = np.full((n, out.shape[1]), np.nan, dtype=np.float32)
            rows[idx] = out
    return rows, failures
