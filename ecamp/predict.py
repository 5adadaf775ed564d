"""Predictions of a fine-tuned model on images: class probabilities, masks or boxes.

>>> model = ecamp.load("local-dir:runs/nih_1/best")      # the folder `ecamp train finetune` writes
>>> probs = ecamp.predict.predict(model, ["a.dcm", "b.png"])
>>> ecamp.predict.predict_files(model, ecamp.embedding.find_images(["films/"]), "preds.csv")

Images are read with the preprocessing the model was trained on (:func:`input_transform`) by the same batched
DataLoader pipeline as :func:`ecamp.embed`. What is written depends on the model's task:

* classification: a CSV or Parquet table (by ``out``'s suffix; Parquet needs ``pyarrow``, the ``parquet`` extra)
  with ``path``, one probability column per label name (sigmoid for multi-label models, softmax for multi-class
  ones, as ``config.json``'s ``ecamp.activation`` records) and ``error``;
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DENSE_TASKS, TASKS, ecamp_cfg_of
from .distributed import select_device
from .errors import InvalidArgumentError
from .folders import kind_of, num_outputs

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


def model_task(model: nn.Module) -> str:
    """``"classification"``, ``"segmentation"`` or ``"detection"``; an encoder without a head is refused."""
    kind = kind_of(model)
    if kind in TASKS:
        return kind
    raise InvalidArgumentError(f"{type(model).__name__} is an image encoder without a classification, segmentation "
                               f"or detection head; `ecamp embed` gives its embeddings, `ecamp train finetune` "
                               f"trains a head.")


def _label_names(model: nn.Module, n: int) -> list[str]:
    names = getattr(model, "label_names", None) or (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return [str(v) for v in names] if names and len(names) == n else [f"class_{i}" for i in range(n)]


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
                     progress: bool = True) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(index, prediction, None)`` or ``(index, None, error message)`` for each input, in input order.

    A prediction is float32 probabilities ``[C]`` (classification), a bool mask ``[K, H, W]`` at the input's size
    (segmentation, on where the sigmoid exceeds 0.5) or ``{"boxes" [N, 4] x1, y1, x2, y2 in the input's pixels,
    "scores" [N], "labels" [N], "image_size" (H, W)}`` (detection). ``device`` defaults to the model's (``"auto"``:
    CUDA, else MPS, else the CPU); ``dtype`` runs it under autocast.
    """
    from .batching import autocast, load_batches

    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}.")
    task = model_task(model)
    activation = ecamp_cfg_of(model).activation
    if activation is None:  # a timm classifier from elsewhere: softmax, as timm's own, unless it has one output
        activation = "sigmoid" if getattr(model, "num_classes", 0) == 1 else "softmax"
    transform = input_transform(model)
    dev = select_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
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
                    logits = model(x).float()
                    probs = torch.sigmoid(logits) if activation == "sigmoid" else logits.softmax(-1)
                    outs = list(probs.cpu().numpy())
                elif task == "segmentation":
                    logits = model(x).float()
                    outs = [(F.interpolate(logits[k:k + 1], size=size, mode="bilinear", align_corners=False)[0]
                             > 0).cpu().numpy() for k, size in enumerate(sizes)]  # sigmoid > 0.5
                else:
                    outs = [_to_original(det, size, x.shape[-2:]) for det, size in zip(model.detect(x), sizes,
                                                                                        strict=True)]
            results = {i: out for (i, _), out in zip(ok, outs, strict=True)}
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


def _check_out(out: Path, task: str) -> None:
    suffixes = _OUT_SUFFIX.get(task)
    suffix = suffixes[0] if suffixes else None
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise InvalidArgumentError(f"A {task} model writes a {' or '.join(suffixes)} file; pass --out "
                                   f"NAME{suffix}, not {out}.", path=out)
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


def _write_parquet(out: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], model_name: str) -> None:
    """The classification table as Parquet: ``path`` and ``error`` strings, one float32 column per label."""
    from .embedding import _pyarrow
    from .fileio import atomic_write

    pa = _pyarrow()
    last = len(header) - 1
    arrays = [pa.array([r[k] for r in rows], pa.string() if k in (0, last) else pa.float32())
              for k in range(len(header))]
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
    stream = iter_predictions(model, files, **kwargs)

    if task == "classification":
        rows = []
        blank = "" if out.suffix.lower() == ".csv" else None  # Parquet: a null probability
        for i, probs, err in stream:
            rows.append([files[i], *([float(p) for p in probs] if err is None else [blank] * len(labels)),
                         err or ""])
            if err is not None:
                failures[files[i]] = err
        if out.suffix.lower() == ".csv":
            write_csv(out, ["path", *labels, "error"], rows)
        else:
            _write_parquet(out, ["path", *labels, "error"], rows, model_name)
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
    return PredictResult(out=out, task=task, files=files, label_names=labels, failures=failures)
