"""Batched embedding of many images, with DataLoader workers and a progress bar.

Unreadable inputs never abort a run: their rows are NaN and they are reported (logged, and returned by
:func:`embed_files`). :func:`embed_files` writes its result atomically and resumes an interrupted run from its
last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .batching import autocast, collect_rows, load_batches, prefetched
from .errors import CheckpointError, DataError, InvalidArgumentError
from .fileio import atomic_write
from .io import DICOM_SUFFIXES, is_dicom

__all__ = ["embed", "embed_files", "merge_embeddings", "parse_shard", "EmbedResult", "find_images", "IMAGE_SUFFIXES"]

logger = logging.getLogger("ecamp")

IMAGE_SUFFIXES = (*DICOM_SUFFIXES, ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Where preprocessing runs: "cpu" (all of it in the DataLoader), "gpu" (workers decode, the rest runs on the embedding
# device in batches: EcampTransform.decode / finish), "auto" (gpu when that device is CUDA)
PREPROCESS_ON = ("cpu", "gpu", "auto")


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def _on_device(preprocess_on: str, transform: Any, device: torch.device) -> bool:
    """Whether the transform's torch half runs on the embedding device (see PREPROCESS_ON)."""
    from .transforms import EcampTransform

    if preprocess_on not in PREPROCESS_ON:
        raise InvalidArgumentError(f"preprocess_on must be one of {PREPROCESS_ON}, got {preprocess_on!r}.")
    fits = isinstance(transform, EcampTransform) and not transform.train
    if preprocess_on == "gpu" and not fits:
        raise InvalidArgumentError("preprocess_on='gpu' needs an eval EcampTransform (ecamp.get_transform(model)); "
                                   "a custom transform runs on the CPU: use preprocess_on='cpu'.")
    return fits and (preprocess_on == "gpu" or device.type == "cuda")


def _batches(model: nn.Module, inputs: Sequence[Any], transform, batch_size: int, num_workers: int,
             device: torch.device, dtype: torch.dtype | None, progress: bool, desc: str, preprocess_on: str = "cpu"):
    """Yield ``(indices, embeddings [b, D] float32 numpy, failures {index: message})`` in input order."""
    on_device = _on_device(preprocess_on, transform, device)
    batches = load_batches(inputs, transform.decode if on_device else transform, batch_size=batch_size,
                           num_workers=num_workers, progress=progress, desc=desc,
                           pin_memory=on_device and device.type == "cuda")
    for ok, failures in (prefetched(batches, device) if on_device else batches):
        out = np.zeros((0,), np.float32)
        if ok:
            with torch.inference_mode():
                x = transform.finish([t for _, t in ok]) if on_device else torch.stack([t for _, t in ok])
                x = x.to(device, dtype=next(model.parameters()).dtype)
                with autocast(device, dtype):
                    out = model(x).float().cpu().numpy()
        yield [i for i, _ in ok], out, failures


def embed(model: nn.Module, inputs: Sequence[Any], *, batch_size: int = 32, num_workers: int = 0,
          device: str | torch.device | None = None, dtype: torch.dtype | None = None, progress: bool = True,
          transform: Callable[[Any], torch.Tensor] | None = None, preprocess_on: str = "auto") -> np.ndarray:
    """Embed images (paths, bytes, PIL images, arrays or tensors) with ``model``: ``[N, D]`` float32, in input order.

    Inputs that cannot be read give NaN rows and a warning naming each one. ``device`` defaults to the model's;
    ``dtype`` (e.g. ``torch.bfloat16``) runs the model under autocast. ``transform`` defaults to
    ``ecamp.get_transform(model)``. ``preprocess_on``: ``"cpu"``, ``"gpu"`` (the workers only decode files;
    intensity policy, resize and normalisation run on ``device``, in batches; in-memory images still take the CPU
    path) or ``"auto"`` (``"gpu"`` when ``device`` is CUDA).
    """
    from .factory import get_transform

    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}.")
    inputs = list(inputs)
    if not inputs:
        raise InvalidArgumentError("embed() got no inputs.")
    transform = transform or get_transform(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    rows, failures = collect_rows(_batches(model, inputs, transform, batch_size, num_workers, dev, dtype, progress,
                                           "embed", preprocess_on), len(inputs))
    if rows is None:
        raise DataError(f"None of the {len(inputs)} inputs could be read; first error: "
                        f"{next(iter(failures.values()))}")
    if failures:
        logger.warning("%d of %d inputs could not be read (NaN rows): %s", len(failures), len(inputs),
                       "; ".join(failures[i] for i in sorted(failures)[:10]))
    return rows


def find_images(paths: Sequence[str | os.PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """Files given directly (in order), then the images inside given folders (recursively, sorted): files with an
    image suffix, and DICOM files without one (PACS exports such as ``IM000001``), recognised by their preamble."""
    found: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            picked = [str(f) for f in files if f.suffix.lower() in suffixes or
                      (not f.suffix and _has_dicom_preamble(f))]
            if len(picked) < len(files):
                logger.info("%s: %d file(s) are not images and were skipped", p, len(files) - len(picked))
            found.extend(picked)
        else:
            found.append(str(p))
    return found


@dataclass
class EmbedResult:
    """``out`` is written when ``complete``; a shard that finished its part leaves its chunks for
    :func:`merge_embeddings`."""

    out: Path
    files: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    resumed_chunks: int = 0
    complete: bool = True
    chunks_done: int = 0


def _run_key(model: nn.Module, transform: Any, files: Sequence[str], model_name: str, chunk_size: int,
             dtype: torch.dtype | None, preprocessing: str = "cpu") -> str:
    """Identity of an embedding run: a resume only re-uses chunks made by the same weights, preprocessing, dtype
    and the same files (path, size and modification time)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    stats = []
    for f in files:
        try:
            st = os.stat(f)
            stats.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f, None, None))
    on_gpu = ["preprocessed on the device"] if preprocessing == "gpu" else []  # CPU runs keep their earlier keys
    h.update(json.dumps([stats, model_name, chunk_size, str(dtype), repr(transform), *on_gpu]).encode())
    return h.hexdigest()[:24]


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _chunk_path(partial: Path, c: int) -> Path:
    return partial / f"chunk-{c:06d}.npz"


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` (0-based ``I``) -> ``(I, N)``; None -> ``(0, 1)``."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise InvalidArgumentError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}.") from None
    if not (n >= 1 and 0 <= i < n):
        raise InvalidArgumentError(f"--shard {spec}: I must be in 0..N-1.")
    return i, n


def _prepare(partial: Path, key: str, files: list[str], chunk_size: int, model_name: str, *, resume: bool,
             shared: bool) -> None:
    """Make ``partial`` hold this run's state. A run alone (``shared=False``) starts over when the folder holds
    another run's chunks; a shard or rank never deletes what other processes may be writing."""
    state_path = partial / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and (state.get("key") != key or not resume):
        if shared:
            raise CheckpointError(f"{partial} holds chunks of another embedding run (other files, weights or "
                                  f"settings); finish that run, or delete the folder and start every shard again.",
                                  path=partial)
        shutil.rmtree(partial)
        state = None
    if state is None:
        if partial.exists() and not shared:  # left by an interrupted start: nothing in it can be trusted
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write(partial / "files.json", lambda p: p.write_text(json.dumps(files)))
        atomic_write(state_path, lambda p: p.write_text(json.dumps({"key": key, "n": len(files),
                                                                    "chunk_size": chunk_size, "model": model_name})))


def _embed_chunk(model, files: list[str], transform, batch_size: int, num_workers: int, dev, dtype,
                 progress: bool, desc: str, preprocess_on: str = "cpu") -> tuple[np.ndarray, dict[int, str]]:
    rows, failed = collect_rows(_batches(model, files, transform, batch_size, num_workers, dev, dtype, progress,
                                         desc, preprocess_on), len(files))
    if rows is None:  # nothing readable in this chunk: width 0, padded to the real width at the end
        rows = np.full((len(files), 0), np.nan, dtype=np.float32)
    return rows, failed


def embed_files(model: nn.Module, files: Sequence[str], out: str | os.PathLike, *, model_name: str = "",
                batch_size: int = 32, num_workers: int = 0, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, progress: bool = True, chunk_size: int = 1024,
                resume: bool = True, shard: tuple[int, int] = (0, 1), preprocess_on: str = "auto") -> EmbedResult:
    """Embed ``files`` into ``out`` (``.npy`` or ``.safetensors``), resumable and order-stable.

    Row i is file i (NaN for unreadable files). ``.npy`` output gets ``<out>.files.txt`` beside it (one path per
    row) and ``<out>.failed.json``; ``.safetensors`` output holds the tensor ``embeddings`` and the file list and
    failures in its metadata. Work is saved in chunks under ``<out>.partial/``: an interrupted run started again
    with the same files continues after the last finished chunk.

    Under torchrun every rank embeds every ``world``-th chunk and rank 0 writes the output once all are done;
    ``shard=(I, N)`` does part ``I`` of ``N`` of that work (job arrays without torchrun) and leaves the chunks for
    :func:`merge_embeddings`. The result is identical to a single process's. ``preprocess_on`` as in :func:`embed`;
    a resume only re-uses chunks preprocessed the same way.
    """
    from .distributed import init_distributed
    from .factory import get_transform

    out = Path(out)
    if out.suffix not in (".npy", ".safetensors"):
        raise InvalidArgumentError(f"Output {out} must end in .npy or .safetensors.", path=out)
    files = [str(f) for f in files]
    if not files:
        raise InvalidArgumentError("No input files (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ").")
    rank, world, _ = init_distributed()
    part, parts = shard[0] * world + rank, shard[1] * world
    transform = get_transform(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    where = "gpu" if _on_device(preprocess_on, transform, dev) else "cpu"
    key = _run_key(model, transform, files, model_name, chunk_size, dtype, where)
    partial = _partial(out)
    if rank == 0:  # one process per shard decides about the folder; the others wait for it
        _prepare(partial, key, files, chunk_size, model_name, resume=resume, shared=shard[1] > 1)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has (re)made the folder
    chunks = [(s, min(s + chunk_size, len(files))) for s in range(0, len(files), chunk_size)]
    mine = [c for c in range(len(chunks)) if c % parts == part]
    resumed = 0
    for c in mine:
        done = _chunk_path(partial, c)
        if done.is_file():
            resumed += 1
            continue
        s, e = chunks[c]
        rows, failed = _embed_chunk(model, files[s:e], transform, batch_size, num_workers, dev, dtype, progress,
                                    f"embed {c + 1}/{len(chunks)}", where)
        fail_json = json.dumps({files[s + i]: m for i, m in failed.items()})

        def write_chunk(p: Path, rows=rows, fail_json=fail_json) -> None:
            with open(p, "wb") as f:
                np.savez(f, rows=rows, failures=np.array(fail_json))

        atomic_write(done, write_chunk)
    if world > 1:
        torch.distributed.barrier()  # every rank's chunks are written
    if shard[1] > 1 or rank != 0:
        return EmbedResult(out=out, files=files, resumed_chunks=resumed, complete=False, chunks_done=len(mine))
    failures = _assemble(partial, out, files, len(chunks), model_name)
    return EmbedResult(out=out, files=files, failures=failures, resumed_chunks=resumed, chunks_done=len(mine))


def merge_embeddings(out: str | os.PathLike) -> EmbedResult:
    """Join the chunks that ``--shard`` runs left under ``<out>.partial/`` into ``out``, once every shard is done."""
    out = Path(out)
    partial = _partial(out)
    if not (partial / "state.json").is_file() or not (partial / "files.json").is_file():
        raise DataError(f"{partial} holds no embedding run; run `ecamp embed ... --out {out} --shard I/N` first.",
                        path=partial)
    state = json.loads((partial / "state.json").read_text())
    files = json.loads((partial / "files.json").read_text())
    n_chunks = -(-state["n"] // state["chunk_size"])
    missing = [c for c in range(n_chunks) if not _chunk_path(partial, c).is_file()]
    if missing:
        raise DataError(f"{partial}: {len(missing)} of {n_chunks} chunks are not done yet (first: "
                        f"{missing[:8]}); run the shards that own them (chunk c belongs to shard c % N), then "
                        f"merge again.", path=partial)
    failures = _assemble(partial, out, files, n_chunks, state.get("model", ""))
    return EmbedResult(out=out, files=files, failures=failures)


def _assemble(partial: Path, out: Path, files: list[str], n_chunks: int, model_name: str) -> dict[str, str]:
    """Write ``out`` (and its sidecars) from the finished chunks, then remove ``partial``; returns the failures."""
    parts, failures = [], {}
    for c in range(n_chunks):  # each chunk read once, its file closed at once
        with np.load(_chunk_path(partial, c)) as z:
            parts.append(z["rows"])
            failures.update(json.loads(str(z["failures"])))
    width = max(r.shape[1] for r in parts)
    if width == 0:
        raise DataError(f"None of the {len(files)} files could be read; see {partial} for the reasons.", path=partial)
    bad = [r.shape[1] for r in parts if r.shape[1] not in (0, width)]
    if bad:
        raise CheckpointError(f"Chunks under {partial} have different widths {sorted(set(bad))} and {width}; "
                              f"remove the folder and run again.", path=partial)
    embeddings = np.concatenate([r if r.shape[1] == width else np.full((r.shape[0], width), np.nan, np.float32)
                                 for r in parts])
    if out.suffix == ".npy":
        def write_npy(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, embeddings)

        # sidecars first, the array last: the .npy only ever appears next to its own file list
        atomic_write(out.with_name(out.name + ".files.txt"), lambda p: p.write_text("\n".join(files) + "\n"))
        atomic_write(out.with_name(out.name + ".failed.json"), lambda p: p.write_text(json.dumps(failures, indent=1)))
        atomic_write(out, write_npy)
    else:
        from safetensors.numpy import save_file

        meta = {"files": json.dumps(files), "failed": json.dumps(failures), "model": model_name}
        atomic_write(out, lambda p: save_file({"embeddings": embeddings}, str(p), metadata=meta))
    shutil.rmtree(partial, ignore_errors=True)
    return failures
