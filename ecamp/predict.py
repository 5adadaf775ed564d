"""Predictions of a fine-tuned model on images: class probabilities, masks or boxes.

>>> model = ecamp.load("local-dir:runs/nih_1/best")      # the folder `ecamp train finetune` writes
>>> probs = ecamp.predict.predict(model, ["a.dcm", "b.png"])
>>> ecamp.predict.predict_files(model, ecamp.embedding.find_images(["films/"]), "preds.csv")

Images are read with the preprocessing the model was trained on (:func:`input_transform`) by the same batched
DataLoader pipeline as :func:`ecamp.embed`. What is written depends on the model's task:

* classification: a CSV or Parquet table (by ``out``'s suffix; Parquet needs ``pyarrow``, the ``parquet`` extra)
  with ``path``, one probability column per label name (sigmoid for multi-label models, softmax for multi-class
  ones, as ``config.json``'s ``ecamp.activation`` records; calibrated where the folder holds an
  ``ecamp.calibration``, unless ``calibrated=False``), one ``<label>_decision`` 0/1 column per label where it
  holds ``ecamp.operating_points`` (and, multi-class, ``prediction``: the most probable class) and ``error``;
* segmentation: a folder with one mask PNG per input at the input's own size (one output: 0/255; several: bit
  ``k`` set where output ``k`` is on) and ``predictions.csv`` (path, mask file, pixels on per label, error);
* detection: a JSON file with, per input, its size and boxes ``[x1, y1, x2, y2]`` in the original image's pixels,
  score and label.

An input that cannot be read is skipped with its reason (logged, and in the output); it never stops a run. Every
output is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calibration import decisions, probabilities
from .config import DENSE_TASKS, TASKS, ecamp_cfg_of
from .distributed import select_device
from .errors import InvalidArgumentError
from .folders import kind_of, num_outputs

if TYPE_CHECKING:
    from .runtime import Prepared

__all__ = ["predict", "predict_files", "iter_predictions", "input_transform", "model_task", "PredictResult",
           "INDEX_NAME"]

logger = logging.getLogger("ecamp")

INDEX_NAME = "predictions.csv"  # the index of a segmentation output folder
_OUT_SUFFIX = {"classification": (".csv", ".parquet"), "detection": (".json",)}


@dataclass
class PredictResult:
    out: Path
    task: str
    files: list[str]
    label_names: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    runtime: str = ""  # what ran, e.g. "openvino bfloat16"


def model_task(model: nn.Module) -> str:
    """``"classification"``, ``"segmentation"`` or ``"detection"``; an encoder without a head is refused."""
    kind = kind_of(model)
    if kind in TASKS and num_outputs(model) < 1:  # a "classifier" of 0 outputs would score its embeddings
        raise InvalidArgumentError(f"{type(model).__name__} is marked {kind} but has no outputs (num_classes 0); "
                                   f"its folder's config.json does not describe a trained head: re-export it.")
    if kind in TASKS:
        return kind
    raise InvalidArgumentError(f"{type(model).__name__} is an image encoder without a classification, segmentation "
                               f"or detection head; `ecamp embed` gives its embeddings, `ecamp train finetune` "
                               f"trains a head.")


def _activation(model: nn.Module) -> str:
    activation = ecamp_cfg_of(model).activation
    if activation is None:  # a timm classifier from elsewhere: softmax, as timm's own, unless it has one output
        activation = "sigmoid" if getattr(model, "num_classes", 0) == 1 else "softmax"
    return activation


def _decision_columns(model: nn.Module, labels: list[str], calibrated: bool) -> tuple[list[str], Any]:
    """The decision columns of a classifier with operating points (checked against its outputs now, before any
    image is read), and a function of a probability row giving their values."""
    block = ecamp_cfg_of(model)
    n, activation = len(labels), _activation(model)
    probabilities(torch.zeros(1, n), activation, block.calibration if calibrated else None)  # sizes checked
    points = block.operating_points
    if points is None:
        return [], lambda probs: []
    decisions(torch.zeros(1, n), points, calibrated=calibrated)
    header = [f"{name}_decision" for name in labels] + (["prediction"] if activation == "softmax" else [])

    def values(probs: np.ndarray) -> list[Any]:
        row = [int(v) for v in decisions(torch.as_tensor(probs)[None], points, calibrated=calibrated)[0]]
        return row + ([labels[int(np.argmax(probs))]] if activation == "softmax" else [])
    return header, values


def _label_names(model: nn.Module, n: int) -> list[str]:
    names = getattr(model, "label_names", None) or (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) != n:  # numbered columns would hide that every name is on the wrong output
        raise InvalidArgumentError(f"{type(model).__name__} has {n} outputs but {len(names)} label names; fix "
                                   f"label_names in its folder's config.json (one per output) or re-export it.")
    return [str(v) for v in names] if names else [f"class_{i}" for i in range(n)]


def input_transform(model: nn.Module) -> Any:
    """The preprocessing ``model`` was trained on: :func:`ecamp.get_transform` for a classifier, the whole-image
    resize of :class:`~ecamp.transforms.DenseTransform` (returning the input and the original size) for a
    segmentation or detection model."""
    from .factory import get_transform
    from .transforms import DenseTransform

    if kind_of(model) not in DENSE_TASKS:
        return get_transform(model)
    block = ecamp_cfg_of(model) if getattr(model, "ecamp_cfg", None) else ecamp_cfg_of(model.encoder)
    cfg = {**dict(model.encoder.pretrained_cfg), "ecamp": block.to_dict()}
    dense = block.dense_input
    return DenseTransform(cfg, **({"resize": dense.resize, "rgb": dense.rgb} if dense else {}))


def iter_predictions(model: nn.Module, inputs: Sequence[Any], *, batch_size: int = 32, num_workers: int = 0,
                     device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                     progress: bool = True, calibrated: bool = True, runtime: str | Prepared = "torch"
                     ) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(index, prediction, None)`` or ``(index, None, error message)`` for each input, in input order.

    A prediction is float32 probabilities ``[C]`` (classification: calibrated by the folder's
    ``ecamp.calibration`` where it has one, unless ``calibrated=False``), a bool mask ``[K, H, W]`` at the input's size
    (segmentation, on where the sigmoid exceeds 0.5) or ``{"boxes" [N, 4] x1, y1, x2, y2 in the input's pixels,
    "scores" [N], "labels" [N], "image_size" (H, W)}`` (detection). ``device`` defaults to the model's (``"auto"``:
    CUDA, else MPS, else the CPU); ``dtype`` runs it under autocast. ``runtime``: ``"torch"``, ``"onnxruntime"``,
    ``"openvino"`` or ``"auto"`` (:mod:`ecamp.runtime`: the exported graph on the CPU, the same outputs), or what
    :func:`ecamp.runtime.prepare` built for this model (its precision replaces ``dtype``).
    """
    from .batching import autocast, load_batches
    from .embedding import _check_counts
    from .runtime import Prepared, prepare

    _check_counts(batch_size=batch_size, num_workers=num_workers)
    task = model_task(model)
    activation, calibration = _activation(model), ecamp_cfg_of(model).calibration if calibrated else None
    transform = input_transform(model)
    dev = select_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    run = runtime if isinstance(runtime, Prepared) else prepare(model, runtime, dev, dtype)
    net = run.forward  # the model itself for torch
    dtype = None if run.graph else run.dtype  # a graph runtime runs at its own precision, outside torch's autocast
    param_dtype = next(model.parameters()).dtype
    for ok, failures in load_batches(inputs, transform, batch_size=batch_size, num_workers=num_workers,
                                     progress=progress, desc="predict"):
        results: dict[int, Any] = {}
        if ok:
            if task == "classification":
                x = torch.stack([t for _, t in ok])
            else:
                x = torch.stack([t for _, (t, _) in ok])
                sizes = [size for _, (_, size) in ok]
            x = x.to(dev, dtype=param_dtype)
            with torch.inference_mode(), autocast(dev, dtype):
                if task == "classification":
                    logits = net(x).float()
                    probs = probabilities(logits, activation, calibration)
                    outs = list(probs.cpu().numpy())
                elif task == "segmentation":
                    logits = net(x).float()
                    outs = [(F.interpolate(logits[k:k + 1], size=size, mode="bilinear", align_corners=False)[0]
                             > 0).cpu().numpy() for k, size in enumerate(sizes)]  # sigmoid > 0.5
                else:
                    outs = [_to_original(det, size, x.shape[-2:]) for det, size in zip(net.detect(x), sizes,
                                                                                      strict=True)]
            results = {i: out for (i, _), out in zip(ok, outs, strict=True)}
            if task == "classification":  # a NaN or infinite score is no prediction (a std of 0, an overflow)
                for i in [i for i, out in results.items() if not np.isfinite(out).all()]:
                    name = inputs[i] if isinstance(inputs[i], (str, os.PathLike)) else f"input {i}"
                    failures[i] = f"{name}: the model's output holds NaN or infinity"
                    del results[i]
        for i in sorted([*results, *failures]):
            yield (i, results[i], None) if i in results else (i, None, failures[i])


def _to_original(det: dict, size: tuple[int, int], input_size: Sequence[int]) -> dict[str, np.ndarray]:
    """Boxes in input pixels -> the original image's pixels (the input is the whole image resized)."""
    (h, w), (ih, iw) = size, input_size
    boxes = det["boxes"].float().cpu() * torch.tensor([w / iw, h / ih, w / iw, h / ih])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {"boxes": boxes.numpy(), "scores": det["scores"].float().cpu().numpy(),
            "labels": det["labels"].cpu().numpy().astype(np.int64), "image_size": (h, w)}


def predict(model: nn.Module, inputs: Sequence[Any], **kwargs: Any) -> list[Any]:
    """Predictions for images (paths, bytes, PIL images, arrays or tensors), in input order, None where an input
    could not be read (a warning names each); ``kwargs`` as :func:`iter_predictions`."""
    inputs = list(inputs)
    if not inputs:
        raise InvalidArgumentError("predict() got no inputs.")
    outputs: list[Any] = [None] * len(inputs)
    failures: dict[int, str] = {}
    for i, out, err in iter_predictions(model, inputs, **kwargs):
        outputs[i] = out
        if err is not None:
            failures[i] = err
    if failures:
        logger.warning("%d of %d inputs could not be read: %s", len(failures), len(inputs),
                       "; ".join(failures[i] for i in sorted(failures)[:10]))
    return outputs


def _earlier_prediction(out: Path) -> bool:
    """Whether the file ``out`` is an output of ecamp predict (which a new run may replace)."""
    try:
        if out.suffix.lower() == ".csv":
            with open(out, encoding="utf-8", errors="replace") as f:
                first = f.readline(1 << 16).rstrip("\r\n")
            return first.startswith("path,") and first.endswith(",error")
        if out.suffix.lower() == ".json":
            return out.stat().st_size < 1 << 30 and "box_format" in json.loads(out.read_text(encoding="utf-8"))
        import pyarrow.parquet

        return b"ecamp.model" in (pyarrow.parquet.read_schema(out).metadata or {})
    except Exception:  # noqa: BLE001 - unreadable as a prediction, whatever the reason
        return False


def _check_out(out: Path, task: str) -> None:
    from .outputs import check_output, remove_stale_temporaries

    suffixes = _OUT_SUFFIX.get(task)
    suffix = suffixes[0] if suffixes else None
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise InvalidArgumentError(f"A {task} model writes a {' or '.join(suffixes)} file; pass --out "
                                   f"NAME{suffix}, not {out}.", path=out)
    check_output(out, folder=suffixes is None)
    remove_stale_temporaries(out)  # what a killed run left beside out
    if suffixes is not None and out.is_file() and not _earlier_prediction(out):
        raise InvalidArgumentError(f"--out {out} exists and is not an earlier prediction; delete it or pass "
                                   f"another name.", path=out)
    if out.suffix.lower() == ".parquet":
        from .embedding import _pyarrow

        _pyarrow()
    if suffixes is None:
        if out.suffix.lower() in (".csv", ".json", ".parquet") or (out.exists() and not out.is_dir()):
            raise InvalidArgumentError(f"A segmentation model writes a folder of mask PNGs (and {INDEX_NAME}); "
                                       f"pass a folder as --out, not the file {out}.", path=out)
        if out.is_dir() and any(out.iterdir()) and not (out / INDEX_NAME).is_file():
            raise InvalidArgumentError(f"{out} already holds files that are not an earlier prediction (no "
                                       f"{INDEX_NAME}); pass a new or empty folder as --out.", path=out)
    elif out.is_dir():
        raise InvalidArgumentError(f"--out {out} is a folder; pass a {suffix} file name.", path=out)


def _mask_names(files: Sequence[str]) -> list[str]:
    """Mask file names mirroring the inputs' paths below their common folder, each ending in .png."""
    paths = [os.path.abspath(f) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    names, seen = [], set()
    for p in paths:
        rel = Path(os.path.relpath(p, root))
        name = rel.with_suffix(".png")
        if str(name) in seen:  # a.dcm beside a.png
            name = rel.with_name(rel.name + ".png")
        k = 1
        while str(name) in seen:
            name, k = rel.with_name(f"{rel.name}-{k}.png"), k + 1
        seen.add(str(name))
        names.append(name.as_posix())
    return names


def _mask_image(mask: np.ndarray) -> np.ndarray:
    """``[K, H, W]`` bool -> uint8 ``[H, W]``: 0/255 for one output, bit k for output k otherwise."""
    if mask.shape[0] == 1:
        return mask[0].astype(np.uint8) * 255
    weights = (1 << np.arange(mask.shape[0], dtype=np.uint16)).astype(np.uint8)
    return np.tensordot(weights, mask.astype(np.uint8), axes=1).astype(np.uint8)


def _write_parquet(out: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], model_name: str,
                   n_probs: int) -> None:
    """The classification table as Parquet: ``path`` and ``error`` strings, one float32 column per label, then
    int8 decisions and the predicted class's name."""
    from .embedding import _pyarrow
    from .fileio import atomic_write

    pa = _pyarrow()
    last = len(header) - 1

    def kind(k: int):
        if k in (0, last) or header[k] == "prediction" and k > n_probs:
            return pa.string()
        return pa.float32() if k <= n_probs else pa.int8()
    arrays = [pa.array([r[k] for r in rows], kind(k)) for k in range(len(header))]
    table = pa.Table.from_arrays(arrays, names=list(header))
    table = table.replace_schema_metadata({"ecamp.model": model_name})
    atomic_write(out, lambda p: pa.parquet.write_table(table, str(p)))


def predict_files(model: nn.Module, files: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  model_name: str = "", **kwargs: Any) -> PredictResult:
    """Predict ``files`` and write ``out`` (module docstring: a .csv or .parquet, a folder or a .json by task);
    ``kwargs`` as
    :func:`iter_predictions`. Unreadable files are listed in the output with their reason."""
    from PIL import Image

    from .fileio import atomic_folder, atomic_write, write_csv
    from .runtime import prepare

    files = [str(f) for f in files]
    if not files:
        raise InvalidArgumentError("No input files (folders are searched for image files and DICOM files).")
    out = Path(out)
    task = model_task(model)
    _check_out(out, task)
    labels = _label_names(model, num_outputs(model))
    if task == "segmentation" and len(labels) > 8:
        raise InvalidArgumentError(f"Mask PNGs hold at most 8 outputs as bits; this model has {len(labels)}.")
    failures: dict[str, str] = {}
    device = kwargs.pop("device", None)
    dev = select_device(device) if device is not None else next(model.parameters()).device
    run = prepare(model.to(dev).eval(), kwargs.pop("runtime", "torch"), dev, kwargs.pop("dtype", None))
    stream = iter_predictions(model, files, device=dev, runtime=run, **kwargs)

    if task == "classification":
        rows = []
        blank = "" if out.suffix.lower() == ".csv" else None  # Parquet: a null probability
        extra, decide = _decision_columns(model, labels, kwargs.get("calibrated", True))
        header = ["path", *labels, *extra, "error"]
        for i, probs, err in stream:
            values = [*(float(p) for p in probs), *decide(probs)] if err is None else [blank] * (len(header) - 2)
            rows.append([files[i], *values, err or ""])
            if err is not None:
                failures[files[i]] = err
        if out.suffix.lower() == ".csv":
            write_csv(out, header, rows)
        else:
            _write_parquet(out, header, rows, model_name, len(labels))
    elif task == "segmentation":
        names = _mask_names(files)

        def write_folder(tmp: Path) -> None:
            rows = []
            for i, mask, err in stream:
                if err is not None:
                    failures[files[i]] = err
                    rows.append([files[i], "", *[""] * len(labels), err])
                    continue
                target = tmp / names[i]
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_mask_image(mask)).save(target)
                rows.append([files[i], names[i], *[int(m.sum()) for m in mask], ""])
            write_csv(tmp / INDEX_NAME, ["path", "mask", *[f"{n}_pixels" for n in labels], "error"], rows)

        atomic_folder(out, write_folder)
    else:
        entries = []
        for i, det, err in stream:
            if err is not None:
                failures[files[i]] = err
                entries.append({"path": files[i], "error": err})
                continue
            entries.append({"path": files[i], "height": det["image_size"][0], "width": det["image_size"][1],
                            "detections": [
                {"box": [round(float(v), 2) for v in box], "score": float(score), "label": labels[int(label)]}
                for box, score, label in zip(det["boxes"], det["scores"], det["labels"], strict=True)]})
        doc = {"model": model_name, "task": task, "label_names": labels,
               "box_format": "x1, y1, x2, y2 in pixels of the original image", "files": entries}
        atomic_write(out, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8"))
    if failures:
        logger.warning("%d of %d files could not be read and were skipped", len(failures), len(files))
    return PredictResult(out=out, task=task, files=files, label_names=labels, failures=failures,
                         runtime=run.describe())
