"""Batched embedding of many images, with DataLoader workers and a progress bar.

What is embedded (``features``, :data:`FEATURES`): ``"pooled"``, the model's output (an encoder's pooled
embedding ``[N, D]``); ``"cls"``, the class token of ``forward_features`` ``[N, C]``; ``"tokens"``, every token
of ``forward_features`` ``[N, T, C]`` (class token first, then the patches row by row).

Unreadable inputs never abort a run: their rows are NaN and they are reported (logged, and returned by
:func:`embed_files`). :func:`embed_files` writes its result atomically (``.npy``, ``.safetensors``, ``.parquet``
or ``.csv``, :data:`OUT_SUFFIXES`) and resumes an interrupted run from its last finished chunk.
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
from .errors import CheckpointError, DataError, InvalidArgumentError, MissingDependencyError
from .fileio import atomic_write
from .io import DICOM_SUFFIXES, is_dicom

__all__ = ["embed", "embed_files", "merge_embeddings", "parse_shard", "EmbedResult", "find_images", "IMAGE_SUFFIXES",
           "FEATURES", "OUT_SUFFIXES", "DEFAULT_MAX_OUTPUT_GB", "output_shape"]

logger = logging.getLogger("ecamp")

IMAGE_SUFFIXES = (*DICOM_SUFFIXES, ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Where preprocessing runs: "cpu" (all of it in the DataLoader), "gpu" (workers decode, the rest runs on the embedding
# device in batches: EcampTransform.decode / finish), "auto" (gpu when that device is CUDA)
PREPROCESS_ON = ("cpu", "gpu", "auto")
# What is embedded: the model's output, the class token, or every token of forward_features
FEATURES = ("pooled", "cls", "tokens")
# What embed_files writes: arrays (.npy, .safetensors) or tables with a path column (.parquet, .csv)
OUT_SUFFIXES = (".npy", ".safetensors", ".parquet", ".csv")
_TABLES = (".parquet", ".csv")
# embed_files refuses an output larger than this many GB (1e9 bytes) unless given a higher limit (or None)
DEFAULT_MAX_OUTPUT_GB = 10.0
_CSV_BYTES_PER_VALUE = 12  # about: a float32 as text with its comma


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


def _check_features(model: nn.Module, features: str) -> None:
    if features not in FEATURES:
        raise InvalidArgumentError(f"features must be one of {FEATURES}, got {features!r}.")
    if features != "pooled" and not callable(getattr(model, "forward_features", None)):
        raise InvalidArgumentError(f"features={features!r} needs a model with forward_features (a timm ViT); "
                                   f"{type(model).__name__} has none: use features='pooled'.")
    if features == "cls" and getattr(model, "cls_token", None) is None and hasattr(model, "num_prefix_tokens"):
        raise InvalidArgumentError("This model has no class token; use features='pooled' or 'tokens'.")


def _features_of(model: nn.Module, x: torch.Tensor, features: str) -> torch.Tensor:
    if features == "pooled":
        return model(x)
    tokens = model.forward_features(x)
    return tokens[:, 0] if features == "cls" else tokens


def output_shape(model: nn.Module, n: int, features: str = "pooled") -> tuple[int, ...]:
    """The shape of the embeddings of ``n`` images: ``(n, D)`` or, for ``"tokens"``, ``(n, T, C)``; found by one
    forward pass of a blank image of the model's ``pretrained_cfg["input_size"]`` on the model's device."""
    _check_features(model, features)
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            y = _features_of(model, torch.zeros((1, *size), device=p.device, dtype=p.dtype), features)
    finally:
        model.train(was_training)
    return (n, *y.shape[1:])


def _output_bytes(shape: Sequence[int], suffix: str) -> int:
    values = int(np.prod(shape, dtype=np.int64))
    return values * (_CSV_BYTES_PER_VALUE if suffix == ".csv" else 4)


def _flattened(batches, shape: list):
    """``(indices, [b, ...], failures)`` -> ``(indices, [b, prod(...)], failures)``; ``shape`` gets the row shape."""
    for idx, out, failures in batches:
        if len(idx):
            shape[:] = out.shape[1:]
            out = out.reshape(len(idx), -1)
        yield idx, out, failures


def _batches(model: nn.Module, inputs: Sequence[Any], transform, batch_size: int, num_workers: int,
             device: torch.device, dtype: torch.dtype | None, progress: bool, desc: str, preprocess_on: str = "cpu",
             features: str = "pooled", forward: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Yield ``(indices, features [b, ...] float32 numpy, failures {index: message})`` in input order.
    ``forward``: a graph runtime's forward (:func:`ecamp.runtime.runtime_model`) in place of torch's."""
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
                with autocast(device, dtype if forward is None else None):
                    y = _features_of(model, x, features) if forward is None else forward(x)
                    out = y.float().cpu().numpy()
        yield [i for i, _ in ok], out, failures


def embed(model: nn.Module, inputs: Sequence[Any], *, batch_size: int = 32, num_workers: int = 0,
          device: str | torch.device | None = None, dtype: torch.dtype | None = None, progress: bool = True,
          transform: Callable[[Any], torch.Tensor] | None = None, preprocess_on: str = "auto",
          features: str = "pooled", runtime: str = "torch") -> np.ndarray:
    """Embed images (paths, bytes, PIL images, arrays or tensors) with ``model``: ``[N, D]`` float32 (``[N, T, C]``
    for ``features="tokens"``; see :data:`FEATURES`), in input order.

    Inputs that cannot be read give NaN rows and a warning naming each one. ``device`` defaults to the model's
    (``"auto"``: CUDA, else MPS, else the CPU); ``dtype`` (e.g. ``torch.bfloat16``) runs the model under
    autocast. ``transform`` defaults to
    ``ecamp.get_transform(model)``. ``preprocess_on``: ``"cpu"``, ``"gpu"`` (the workers only decode files;
    intensity policy, resize and normalisation run on ``device``, in batches; in-memory images still take the CPU
    path) or ``"auto"`` (``"gpu"`` when ``device`` is CUDA). ``runtime``: ``"torch"``, ``"onnxruntime"``,
    ``"openvino"`` or ``"auto"`` (:mod:`ecamp.runtime`; the graph runtimes give the pooled embedding, on the CPU).
    """
    from .distributed import select_device
    from .factory import get_transform

    _check_features(model, features)
    _check_counts(batch_size=batch_size, num_workers=num_workers)
    inputs = list(inputs)
    if not inputs:
        raise InvalidArgumentError("embed() got no inputs.")
    transform = transform or get_transform(model)
    dev = select_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    run = _prepare_runtime(model, runtime, dev, dtype, features)
    forward = run.forward if run.graph else None
    shape: list = []
    rows, failures = collect_rows(_flattened(_batches(model, inputs, transform, batch_size, num_workers, dev,
                                                      run.dtype, progress, "embed", preprocess_on, features, forward),
                                             shape),
                                  len(inputs))
    if rows is not None:
        rows, failures = _non_finite_failed(rows, failures, inputs)
    if rows is None:
        raise DataError(f"None of the {len(inputs)} inputs could be read; first error: "
                        f"{next(iter(failures.values()))}")
    if failures:
        logger.warning("%d of %d inputs could not be read (NaN rows): %s", len(failures), len(inputs),
                       "; ".join(failures[i] for i in sorted(failures)[:10]))
    return rows.reshape(len(inputs), *shape)


def _non_finite_failed(rows: np.ndarray, failed: dict[int, str], inputs: Sequence[Any]
                       ) -> tuple[np.ndarray | None, dict[int, str]]:
    """Rows holding NaN or infinity (a config's std of 0, an overflow under float16) become failures, NaN rows as
    unreadable inputs are; ``None`` when no row is left."""
    bad = [i for i in np.flatnonzero(~np.isfinite(rows).all(axis=1)) if i not in failed]
    if not bad:
        return rows, failed
    failed = dict(failed)
    for i in bad:
        name = inputs[i] if isinstance(inputs[i], (str, os.PathLike)) else f"input {i}"
        failed[int(i)] = f"{name}: the model's output holds NaN or infinity (check the model's mean and std, or " \
                         f"run in float32)"
    rows = rows.copy()
    rows[bad] = np.nan
    return (None if len(failed) == len(rows) else rows), failed


def find_images(paths: Sequence[str | os.PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """Files given directly (in order), then the images inside given folders (recursively, sorted): files with an
    image suffix, and DICOM files without one (PACS exports such as ``IM000001``), recognised by their preamble."""
    found: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            unreadable: list[OSError] = []  # a folder without read permission: its images must not vanish unsaid
            files = sorted(f for d, _, names in os.walk(p, onerror=unreadable.append) for n in names
                           if (f := Path(d, n)).is_file())
            if unreadable:
                logger.warning("%s: %d folder(s) could not be read and were skipped: %s", p, len(unreadable),
                               "; ".join(f"{e.filename} ({e.strerror})" for e in unreadable[:5]))
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
    runtime: str = ""  # what ran, e.g. "openvino bfloat16" (empty for a merge)


def _run_key(model: nn.Module, transform: Any, files: Sequence[str], model_name: str, chunk_size: int,
             dtype: torch.dtype | None, preprocessing: str = "cpu", features: str = "pooled",
             runtime: str = "torch") -> str:
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
    what = [f"features={features}"] if features != "pooled" else []  # so do pooled ones
    what += [f"runtime={runtime}"] if runtime != "torch" else []  # and torch ones
    h.update(json.dumps([stats, model_name, chunk_size, str(dtype), repr(transform), *on_gpu, *what]).encode())
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


def _files_hash(files: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(files)).encode()).hexdigest()[:24]


def _read_state(partial: Path) -> tuple[dict[str, Any], list[str]]:
    """``state.json`` and ``files.json`` of a run folder, every field checked (an interrupted write or an edit
    must not become a wrong merge, a traceback or a loop over 10^12 chunks); raises :class:`CheckpointError`."""
    try:
        state = json.loads((partial / "state.json").read_text(encoding="utf-8"))
        files = json.loads((partial / "files.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{partial}: state.json or files.json is unreadable ({str(e)[:200]}); delete the "
                              f"folder and run the embedding again.", path=partial) from e
    problem = None
    if not isinstance(state, dict) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        problem = "state.json is not an object or files.json is not a list of paths"
    elif not isinstance(state.get("key"), str):
        problem = "state.json has no run key"
    elif not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 1
                 for k in ("n", "chunk_size")):
        problem = f"n and chunk_size must be positive counts, got {state.get('n')!r:.40} and " \
                  f"{state.get('chunk_size')!r:.40}"
    elif state["n"] != len(files):
        problem = f"state.json counts {state['n']} files but files.json lists {len(files)}"
    elif state.get("features", "pooled") not in FEATURES:
        problem = f"features {state.get('features')!r:.40} is not one of {FEATURES}"
    if problem:
        raise CheckpointError(f"{partial}: {problem}; delete the folder and run the embedding again.", path=partial)
    return state, files


def _rows_shape(z: Any) -> tuple[int, ...]:
    """The shape of an open chunk's ``rows`` from its header (the rows of token features are large)."""
    with z.zip.open("rows.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return tuple(read(f)[0])


def _chunk_problem(path: Path, key: str, files: Sequence[str], c: int, rows: int) -> str | None:
    """Why chunk ``c`` at ``path`` is not this run's chunk ``c`` of ``rows`` rows (None when it is); the bytes
    are checked against the chunk's checksums without loading its rows."""
    try:
        with np.load(path) as z:
            if z.zip.testzip() is not None:
                raise ValueError("checksum")
            meta = json.loads(str(z["meta"]))
            n, width = _rows_shape(z)
            shape = tuple(int(v) for v in z["shape"])
            json.loads(str(z["failures"]))
    except Exception as e:  # noqa: BLE001 - truncated or foreign bytes fail in numpy, zipfile or json
        return f"unreadable ({type(e).__name__})"
    expected = {"key": key, "files": _files_hash(files), "chunk": c, "rows": rows}
    if not isinstance(meta, dict) or {k: meta.get(k) for k in expected} != expected:
        return "made by another run, for other files or another position"
    if n != rows or (width and int(np.prod(shape)) != width):
        return f"holds {n} rows of width {width}, not {rows} rows of shape {shape}"
    return None


def _prepare(partial: Path, key: str, files: list[str], chunk_size: int, model_name: str, *, resume: bool,
             shared: bool, features: str = "pooled") -> None:
    """Make ``partial`` hold this run's state. A run alone (``shared=False``) starts over when the folder holds
    another run's chunks; a shard or rank never deletes what other processes may be writing."""
    state_path = partial / "state.json"
    state = None
    if state_path.is_file():
        try:
            state, _ = _read_state(partial)
        except CheckpointError as e:
            if shared:
                raise
            logger.warning("%s; starting over", str(e).split("; delete")[0])
            state = {}
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
                                                                    "chunk_size": chunk_size, "model": model_name,
                                                                    "features": features})))


def _embed_chunk(model, files: list[str], transform, batch_size: int, num_workers: int, dev, dtype,
                 progress: bool, desc: str, preprocess_on: str = "cpu", features: str = "pooled", forward=None
                 ) -> tuple[np.ndarray, tuple[int, ...], dict[int, str]]:
    """Rows ``[n, prod(row shape)]``, the row shape and the failures of one chunk."""
    shape: list = []
    rows, failed = collect_rows(_flattened(_batches(model, files, transform, batch_size, num_workers, dev, dtype,
                                                    progress, desc, preprocess_on, features, forward), shape),
                                len(files))
    if rows is not None:
        rows, failed = _non_finite_failed(rows, failed, files)
    if rows is None:  # nothing readable in this chunk: width 0, padded to the real width at the end
        rows = np.full((len(files), 0), np.nan, dtype=np.float32)
    return rows, tuple(shape), failed


def _prepare_runtime(model: nn.Module, runtime: str, device: torch.device, dtype: torch.dtype | None,
                     features: str):
    """:func:`ecamp.runtime.prepare`: ``auto`` stays on torch for features the exported graph does not give (it
    gives the pooled embedding), and a graph runtime named for them is refused."""
    from .runtime import prepare, resolve_runtime

    if features != "pooled":
        if resolve_runtime(runtime, device, dtype)[0] != "torch" and runtime != "auto":
            raise InvalidArgumentError(f"--runtime {runtime} runs the exported graph, which gives the pooled "
                                       f"embedding; use --features pooled, or --runtime torch for {features!r} "
                                       f"features.")
        runtime = "torch"
    return prepare(model, runtime, device, dtype)


def _check_counts(**counts: int) -> None:
    """batch_size and chunk_size positive, num_workers zero or more: refused before the model is run."""
    for name, value in counts.items():
        low = 0 if name == "num_workers" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidArgumentError(f"{name} (--{name.replace('_', '-')}) must be an integer of at least {low}, "
                                       f"got {value!r}.")


def _check_out(out: Path, features: str) -> None:
    from .outputs import check_output

    if out.suffix not in OUT_SUFFIXES:
        raise InvalidArgumentError(f"Output {out} must end in {', '.join(OUT_SUFFIXES)}.", path=out)
    check_output(out)
    if features == "tokens" and out.suffix in _TABLES:
        raise InvalidArgumentError(f"Token features are [N, T, C]: write them to .safetensors or .npy, not {out} "
                                   f"(a table holds one row of columns per image: use --features pooled or cls).",
                                   path=out)
    if out.suffix == ".parquet":
        _pyarrow()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise MissingDependencyError("Parquet output needs pyarrow: pip install \"ecamp[parquet]\" (or write .csv, "
                                     ".npy or .safetensors).") from e
    return pyarrow


def embed_files(model: nn.Module, files: Sequence[str], out: str | os.PathLike, *, model_name: str = "",
                batch_size: int = 32, num_workers: int = 0, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, progress: bool = True, chunk_size: int = 1024,
                resume: bool = True, shard: tuple[int, int] = (0, 1), preprocess_on: str = "auto",
                features: str = "pooled", max_output_gb: float | None = DEFAULT_MAX_OUTPUT_GB,
                announce: Callable[[str], None] | None = None, runtime: str = "torch") -> EmbedResult:
    """Embed ``files`` into ``out`` (``.npy``, ``.safetensors``, ``.parquet`` or ``.csv``), resumable and
    order-stable.

    Row i is file i (NaN for unreadable files). ``.npy`` output gets ``<out>.files.txt`` beside it (one path per
    row) and ``<out>.failed.json``; ``.safetensors`` output holds the tensor ``embeddings`` and the file list and
    failures in its metadata; ``.parquet`` and ``.csv`` output is a table with a ``path`` column and one column per
    feature (``f0``, ``f1``, ...), its failures in ``<out>.failed.json`` (Parquet: also in the file's metadata).
    ``features`` (:data:`FEATURES`): ``"tokens"`` gives ``[N, T, C]``, written only to ``.safetensors`` or
    ``.npy``. Work is saved in chunks under ``<out>.partial/``: an interrupted run started again with the same
    files continues after the last finished chunk.

    Before anything runs, the output's size is stated (``announce``, default: logged) and an output of more than
    ``max_output_gb`` GB (1e9 bytes; CSV counted at about 12 bytes a value) is refused; ``None`` lifts the limit.

    Under torchrun every rank embeds every ``world``-th chunk and rank 0 writes the output once all are done;
    ``shard=(I, N)`` does part ``I`` of ``N`` of that work (job arrays without torchrun) and leaves the chunks for
    :func:`merge_embeddings`. The result is identical to a single process's. ``preprocess_on`` and ``runtime`` as in
    :func:`embed`; a resume only re-uses chunks preprocessed and run the same way.
    """
    from .distributed import init_distributed, select_device
    from .factory import get_transform

    out = Path(out)
    _check_features(model, features)
    _check_counts(batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers)
    _check_out(out, features)
    files = [str(f) for f in files]
    if not files:
        raise InvalidArgumentError("No input files (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ").")
    rank, world, _ = init_distributed()
    part, parts = shard[0] * world + rank, shard[1] * world
    transform = get_transform(model)
    dev = select_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    where = "gpu" if _on_device(preprocess_on, transform, dev) else "cpu"
    shape = output_shape(model, len(files), features)
    size = _output_bytes(shape, out.suffix)
    message = (f"{features} features of {len(files)} files: [{', '.join(map(str, shape))}] float32, "
               f"{'about ' if out.suffix == '.csv' else ''}{_gb(size)} -> {out}")
    if max_output_gb is not None and size > max_output_gb * 1e9:
        raise InvalidArgumentError(f"{message} is over the limit of {max_output_gb:g} GB; raise it "
                                   f"(max_output_gb=, --max-output-gb) or embed fewer files or features.", path=out)
    if rank == 0:
        (announce or logger.info)(message)
    run = _prepare_runtime(model, runtime, dev, dtype, features)
    forward, dtype = (run.forward if run.graph else None), run.dtype
    key = _run_key(model, transform, files, model_name, chunk_size, dtype, where, features, run.runtime)
    partial = _partial(out)
    if rank == 0:  # one process per shard decides about the folder; the others wait for it
        _prepare(partial, key, files, chunk_size, model_name, resume=resume, shared=shard[1] > 1, features=features)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has (re)made the folder
    chunks = [(s, min(s + chunk_size, len(files))) for s in range(0, len(files), chunk_size)]
    mine = [c for c in range(len(chunks)) if c % parts == part]
    resumed = 0
    for c in mine:
        done = _chunk_path(partial, c)
        s, e = chunks[c]
        if done.is_file():
            problem = _chunk_problem(done, key, files, c, e - s)
            if problem is None:
                resumed += 1
                continue
            logger.warning("%s is %s; embedding it again", done, problem)
        rows, row_shape, failed = _embed_chunk(model, files[s:e], transform, batch_size, num_workers, dev, dtype,
                                               progress, f"embed {c + 1}/{len(chunks)}", where, features, forward)
        fail_json = json.dumps({files[s + i]: m for i, m in failed.items()})
        meta = json.dumps({"key": key, "files": _files_hash(files), "chunk": c, "rows": e - s})

        def write_chunk(p: Path, rows=rows, fail_json=fail_json, row_shape=row_shape, meta=meta) -> None:
            with open(p, "wb") as f:
                np.savez(f, rows=rows, failures=np.array(fail_json), shape=np.array(row_shape, dtype=np.int64),
                         meta=np.array(meta))

        atomic_write(done, write_chunk)
    if world > 1:
        torch.distributed.barrier()  # every rank's chunks are written
    if shard[1] > 1 or rank != 0:
        return EmbedResult(out=out, files=files, resumed_chunks=resumed, complete=False, chunks_done=len(mine),
                           runtime=run.describe())
    state = {"key": key, "n": len(files), "chunk_size": chunk_size}
    failures = _assemble(partial, out, files, state, model_name)
    return EmbedResult(out=out, files=files, failures=failures, resumed_chunks=resumed, chunks_done=len(mine),
                       runtime=run.describe())


def merge_embeddings(out: str | os.PathLike) -> EmbedResult:
    """Join the chunks that ``--shard`` runs left under ``<out>.partial/`` into ``out``, once every shard is done."""
    out = Path(out)
    partial = _partial(out)
    if not (partial / "state.json").is_file() or not (partial / "files.json").is_file():
        raise DataError(f"{partial} holds no embedding run; run `ecamp embed ... --out {out} --shard I/N` first.",
                        path=partial)
    state, files = _read_state(partial)
    _check_out(out, state.get("features", "pooled"))
    n_chunks = -(-state["n"] // state["chunk_size"])
    missing = [c for c in range(n_chunks) if not _chunk_path(partial, c).is_file()]
    if missing:
        raise DataError(f"{partial}: {len(missing)} of {n_chunks} chunks are not done yet (first: "
                        f"{missing[:8]}); run the shards that own them (chunk c belongs to shard c % N), then "
                        f"merge again.", path=partial)
    model_name = state.get("model", "")
    failures = _assemble(partial, out, files, state, model_name if isinstance(model_name, str) else "")
    return EmbedResult(out=out, files=files, failures=failures)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _chunk_info(partial: Path, state: dict[str, Any], files: list[str]
                ) -> tuple[list[int], tuple[int, ...], dict[str, str]]:
    """Each chunk's number of rows, the row shape of the chunks that have rows, and every failure; a chunk that
    is not this run's (another run's, the wrong rows, unreadable) is removed, so that its shard redoes it."""
    n, size = state["n"], state["chunk_size"]
    n_chunks = -(-n // size)
    bad = []
    for c in range(n_chunks):
        problem = _chunk_problem(_chunk_path(partial, c), state["key"], files, c, min(size, n - c * size))
        if problem:
            bad.append(f"chunk {c} {problem}")
            _chunk_path(partial, c).unlink(missing_ok=True)
    if bad:
        raise CheckpointError(f"{partial}: {len(bad)} chunk(s) are not this run's and were removed, nothing was "
                              f"written ({'; '.join(bad[:3])}); run again the embedding or the shards that own "
                              f"them (chunk c belongs to shard c % N), then merge.", path=partial)
    counts, shape, failures = [], None, {}
    for c in range(n_chunks):  # each chunk read once, its file closed at once
        with np.load(_chunk_path(partial, c)) as z:
            n, width = _rows_shape(z)
            failures.update(json.loads(str(z["failures"])))
            row_shape = tuple(int(v) for v in z["shape"])
        counts.append(n)
        if width == 0:
            continue
        if int(np.prod(row_shape)) != width or (shape is not None and row_shape != shape):
            raise CheckpointError(f"Chunks under {partial} have different widths {row_shape} and {shape}; "
                                  f"remove the folder and run again.", path=partial)
        shape = row_shape
    if shape is None:
        raise DataError(f"None of the {sum(counts)} files could be read; see {partial} for the reasons.",
                        path=partial)
    return counts, shape, failures


def _chunks(partial: Path, counts: Sequence[int], shape: tuple[int, ...]):
    """Each chunk's rows as ``[n, *shape]`` float32, NaN for a chunk where nothing could be read."""
    for c, n in enumerate(counts):
        with np.load(_chunk_path(partial, c)) as z:
            rows = z["rows"]
        yield np.full((n, *shape), np.nan, np.float32) if rows.shape[1] == 0 else rows.reshape(n, *shape)


def _write_safetensors(p: Path, partial: Path, counts: Sequence[int], shape: tuple[int, ...],
                       meta: dict[str, str]) -> None:
    """The safetensors file of one float32 tensor ``embeddings``, written chunk by chunk (never whole in memory)."""
    full = [sum(counts), *shape]
    nbytes = int(np.prod(full, dtype=np.int64)) * 4
    header = json.dumps({"__metadata__": meta,
                         "embeddings": {"dtype": "F32", "shape": full, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    with open(p, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for rows in _chunks(partial, counts, shape):
            f.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())


def _write_table(p: Path, suffix: str, partial: Path, counts: Sequence[int], shape: tuple[int, ...],
                 files: list[str], failures: dict[str, str], model_name: str) -> None:
    columns = [f"f{i}" for i in range(int(np.prod(shape)))]
    if suffix == ".csv":
        import csv

        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", *columns])
            k = 0
            for rows in _chunks(partial, counts, shape):
                for row in rows.reshape(len(rows), -1):
                    w.writerow([files[k], *(repr(float(v)) for v in row)])
                    k += 1
        return
    pa = _pyarrow()
    rows = np.concatenate(list(_chunks(partial, counts, shape))).reshape(len(files), -1)
    table = pa.table({"path": pa.array(files, pa.string()),
                      **{name: pa.array(rows[:, i]) for i, name in enumerate(columns)}})
    table = table.replace_schema_metadata({"ecamp.model": model_name, "ecamp.failed": json.dumps(failures)})
    pa.parquet.write_table(table, str(p))


def _assemble(partial: Path, out: Path, files: list[str], state: dict[str, Any], model_name: str
              ) -> dict[str, str]:
    """Write ``out`` (and its sidecars) from the finished chunks, then remove ``partial``; returns the failures."""
    counts, shape, failures = _chunk_info(partial, state, files)
    if out.suffix == ".npy":
        def write_npy(p: Path) -> None:
            arr = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(len(files), *shape))
            k = 0
            for rows in _chunks(partial, counts, shape):
                arr[k:k + len(rows)] = rows
                k += len(rows)
            arr.flush()
            del arr

        # sidecars first, the array last: the .npy only ever appears next to its own file list
        atomic_write(out.with_name(out.name + ".files.txt"), lambda p: p.write_text("\n".join(files) + "\n"))
        atomic_write(out.with_name(out.name + ".failed.json"), lambda p: p.write_text(json.dumps(failures, indent=1)))
        atomic_write(out, write_npy)
    elif out.suffix == ".safetensors":
        meta = {"files": json.dumps(files), "failed": json.dumps(failures), "model": model_name}
        atomic_write(out, lambda p: _write_safetensors(p, partial, counts, shape, meta))
    else:
        atomic_write(out.with_name(out.name + ".failed.json"), lambda p: p.write_text(json.dumps(failures, indent=1)))
        atomic_write(out, lambda p: _write_table(p, out.suffix, partial, counts, shape, files, failures, model_name))
    shutil.rmtree(partial, ignore_errors=True)
    return failures
