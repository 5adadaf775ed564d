"""Training checkpoints: written atomically, read with ``weights_only=True``, RNG states included.

A checkpoint is a dict of tensors, numbers, strings and lists (``torch.save``); reading it never unpickles code.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecamp.errors import CheckpointError
from ecamp.fileio import atomic_write

__all__ = ["CHECKPOINT_RE", "checkpoint_name", "latest_checkpoint", "load_checkpoint", "save_checkpoint",
           "rng_state", "set_rng_state"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def _numbered(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("checkpoint-*.pt") if CHECKPOINT_RE.match(p.name))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = _numbered(Path(folder))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (``best.pt`` or ``checkpoint-*.pt``), read with ``weights_only=True``."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(f"{path} is not a readable ecamp training checkpoint: {e}", path=path) from e


def save_checkpoint(path: str | Path, state: dict[str, Any], *, keep_last: int | None = None) -> Path:
    """Write ``state`` atomically; with ``keep_last``, prune the folder's numbered checkpoints to that many."""
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if keep_last:
        for old in _numbered(path.parent)[:-keep_last]:
            old.unlink()
    return path


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (torch, numpy, python, CUDA), as checkpoint-safe values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                       int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
