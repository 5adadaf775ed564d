"""Where a command writes, checked before it works: a missing or read-only folder, or a folder where a file goes,
must fail in the first second, not after an hour of embedding or an upload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import InvalidArgumentError

__all__ = ["check_output", "remove_stale_temporaries"]


def check_output(path: str | os.PathLike, *, folder: bool = False, option: str = "--out") -> Path:
    """``path`` as a :class:`~pathlib.Path` if a file (``folder=False``) or a folder can be written there: its
    parent exists (a folder output's nearest existing ancestor, as folders are created) and accepts a new file.
    Raises :class:`~ecamp.errors.InvalidArgumentError` naming ``option`` otherwise."""
    path = Path(path)
    if not folder and path.is_dir():
        raise InvalidArgumentError(f"{option} {path} is a folder; pass a file name.", path=path)
    if folder and path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"{option} {path} is a file; pass a folder.", path=path)
    parent = path.absolute().parent
    if folder:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise InvalidArgumentError(f"{option} {path}: {parent} {what}; create it or pass another place.", path=path)
    probe = parent / f".{path.name}.probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InvalidArgumentError(f"{option} {path}: cannot write in {parent} ({e.strerror or e}); pass another "
                                   f"place or fix its permissions.", path=path) from e
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders that an atomic write of ``path`` left
    when its process was killed (the process is gone); those of a running process are left alone."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        kind, _, tag = leftover.name[len(path.name) + 2:].partition("-")
        pid = tag.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True
