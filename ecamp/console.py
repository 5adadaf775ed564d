"""What the commands show on the console: errors as one line, and progress.

:func:`run_command` runs a parsed command (``ecamp ...``, ``ecamp train ...``): ecamp's errors become one line on
standard error and exit status 2. :func:`progress_bar` is a tqdm bar on a terminal and a plain line every so often
anywhere else.

Batch systems write a job's output to a file, where a bar's carriage-return updates pile up (megabytes over a
multi-day run). When standard error is not a terminal, :func:`progress_bar` prints one line
``desc: n/total (p %), elapsed, rate`` at most every ``ECAMP_PROGRESS_INTERVAL`` seconds (default 60) and at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import EcampError

__all__ = ["progress_bar", "run_command"]


def run_command(prog: str, args: argparse.Namespace, *, verbose: bool) -> int:
    """Run ``args.func(args)`` as a command: ecamp's errors become one line on stderr and exit status 2."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("ecamp").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        return args.func(args)
    except EcampError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class _Lines:
    """The subset of tqdm's interface ecamp uses (``update``, ``set_postfix``, ``close``, iteration)."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int,
                 interval: float, stream: Any):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start, self.interval, self.stream = initial, time.monotonic(), interval, stream
        self._last, self._postfix, self._closed = self.start, "", False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        post = f", {self._postfix}" if self._postfix else ""
        return f"{self.desc}: {done} {self.unit}{pct}, {elapsed:.0f} s{rate}{post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def set_postfix(self, **kwargs: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            print(self._line(), file=self.stream, flush=True)


class _Off:
    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool = False, stream: Any = None) -> Any:
    """A progress display over ``iterable`` (or updated by hand up to ``total``)."""
    if disable:
        return _Off(iterable)
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream)
    interval = float(os.environ.get("ECAMP_PROGRESS_INTERVAL", 60))
    return _Lines(iterable, total, desc, unit, initial, interval, stream)
