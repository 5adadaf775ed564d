"""Deployment graphs of an ecamp model: ONNX (``ecamp[onnx]``) or TorchScript, checked against torch.

:func:`export` writes, into one folder and atomically (a crash leaves the previous folder or none):

* ``model.onnx`` or ``model.pt`` (TorchScript): the network, with a dynamic batch axis on its one input
  ``pixel_values`` [batch, 3, H, W] (the normalised image, as :func:`ecamp.get_transform` or
  :class:`ecamp.transforms.DenseTransform` give it);
* ``config.json``: the model folder's own (``pretrained_cfg``, the ``ecamp`` block: modality, intensity policy,
  grey to three channels), so a deployment reads its images as the weights expect;
* ``export.json``: the format, opset, input and output names and shapes, what the outputs are, the
  preprocessing, the torch and ecamp versions, the graph's sha256 and the parity measured at export time.

Before anything is moved into place the graph is run (ONNX Runtime, or the reloaded TorchScript module) on the
same tensors as the torch model, at two batch sizes; a maximum absolute difference above ``atol`` (1e-4 for fp32)
raises :class:`~ecamp.errors.ExportParityError` and writes nothing.

What each kind exports: an encoder its pooled embedding [batch, D]; a classifier its logits [batch, classes]; a
segmentation model its mask logits [batch, outputs, H, W] (threshold the sigmoid at 0.5 as ``ecamp predict``
does); a detection model its three raw YOLO maps, coarsest first. YOLO decoding and the NMS stay in Python
(:meth:`OnnxModel.detect` runs ecamp's own :func:`~ecamp.models.heads.decode` and
:func:`~ecamp.models.heads.postprocess` on the graph's outputs): ONNX's ``NonMaxSuppression`` does not implement
the authors' IoU convention, so an exported NMS would not give the same boxes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportParityError, InvalidArgumentError, MissingDependencyError, ModelFolderError

__all__ = ["FORMATS", "DEFAULT_OPSET", "DEFAULT_ATOL", "export", "OnnxModel"]

logger = logging.getLogger("ecamp")

PathLike = str | os.PathLike
FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
INPUT_NAME = "pixel_values"
_GRAPH = {"onnx": "model.onnx", "torchscript": "model.pt"}
_DETECTION_OUTPUTS = ("raw_coarse", "raw_middle", "raw_fine")
_CHECK_BATCHES = (2, 3)  # the traced batch and another one: the batch axis must really be dynamic


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs the onnx extra ({e.name} is missing): "
                                     f"pip install \"ecamp[onnx]\"") from e
    return onnx, onnxruntime


def _folder_of(source: Any, tmp: Path, manifest: Any) -> tuple[Path, str]:
    """The model folder to export from: ``source`` itself when it is one, else a folder written into ``tmp``."""
    from .factory import resolve, resolve_files
    from .folders import CONFIG_NAME, WEIGHTS_NAME, save_pretrained

    if isinstance(source, nn.Module):
        folder = tmp / "folder"
        save_pretrained(source, folder)
        return folder, type(source).__name__
    name = str(source)
    src = resolve(name, manifest=manifest)
    if src.folder is not None:
        return Path(src.folder), src.label
    src, paths = resolve_files(src, [CONFIG_NAME, WEIGHTS_NAME], manifest=manifest)
    folder = tmp / "folder"
    folder.mkdir()
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copyfile(paths[fname], folder / fname)
    return folder, src.label


class _Graph(nn.Module):
    """The exported network: one tensor in, a tensor (or the detection maps) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values)
        return tuple(out) if isinstance(out, (list, tuple)) else out


def _outputs(kind: str, model: nn.Module) -> tuple[list[str], str]:
    if kind == "detection":
        return list(_DETECTION_OUTPUTS), ("the three raw YOLO maps [batch, 3 * (5 + classes), h, w], coarsest first; "
                                          "decode and NMS in Python (ecamp.export.OnnxModel.detect)")
    if kind == "segmentation":
        return ["logits"], "mask logits [batch, outputs, H, W]; a pixel is in the mask where sigmoid(logit) >= 0.5"
    if kind == "classification":
        return ["logits"], f"class logits [batch, {model.num_classes}]"
    return ["embedding"], f"pooled embedding [batch, {model.num_features}]"


def _input_size(model: nn.Module, kind: str) -> tuple[int, int, int]:
    enc = model.encoder if kind in ("segmentation", "detection") else model
    c, h, w = (int(v) for v in enc.pretrained_cfg["input_size"])
    return c, h, w


def _as_list(out: Any) -> list[torch.Tensor]:
    return [out] if torch.is_tensor(out) else list(out)


def _write_onnx(graph: nn.Module, example: torch.Tensor, path: Path, names: list[str], opset: int) -> int:
    onnx, _ = _onnx_modules()
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs the onnx extra ({e.name} is missing): "
                                     f"pip install \"ecamp[onnx]\"") from e
    batch = torch.export.Dim("batch", min=1, max=4096)
    # the exporter reports its stages on stdout; a library keeps stdout for its caller
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=names,
                                    dynamic_shapes={"pixel_values": {0: batch}}, opset_version=opset,
                                    verbose=False, external_data=False)
    program.save(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)


def _write_torchscript(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices; the parity check decides
        traced = torch.jit.trace(graph, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


def _run_graph(fmt: str, path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    if fmt == "onnx":
        _, ort = _onnx_modules()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: x.numpy()})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [o.float() for o in _as_list(module(x))]


def export(model: nn.Module | str | PathLike, out: PathLike, *, format: str = "onnx", opset: int = DEFAULT_OPSET,
           atol: float = DEFAULT_ATOL, manifest: Any = None, seed: int = 0) -> dict[str, Any]:
    """Export an encoder, classifier, segmentation or detection model to ``out`` (see the module) and return
    what ``export.json`` records, the parity included (``parity["max_abs_diff"]``).

    Args:
        model: a model ecamp builds (``ecamp.load``, the heads of :mod:`ecamp.models.heads`), or a name
            ``ecamp.load`` takes: manifest name, ``hf-hub:org/repo[@rev]``, ``local-dir:/path`` or a folder.
        out: the folder to write (replaced whole if it exists).
        format: ``"onnx"`` (needs ``ecamp[onnx]``) or ``"torchscript"``.
        opset: the ONNX opset to export with (the one the file holds is recorded).
        atol: the largest maximum absolute difference from torch accepted (fp32).
        manifest: another weights manifest, for manifest names.
        seed: seeds the random check tensors.
    """
    from .config import ModelConfig
    from .factory import LOCAL_DIR_PREFIX, load
    from .fileio import atomic_folder, sha256_file
    from .folders import CONFIG_NAME, kind_of
    from .version import __version__

    if format not in FORMATS:
        raise InvalidArgumentError(f"--format {format!r}: use one of {', '.join(FORMATS)}.")
    if not (0 < atol < 1):
        raise InvalidArgumentError(f"atol {atol} must lie in (0, 1); the fp32 tolerance is {DEFAULT_ATOL}.")
    if format == "onnx":
        _onnx_modules()  # a missing extra is said before any work
    scratch = Path(tempfile.mkdtemp(prefix="ecamp-export-"))
    try:
        folder, label = _folder_of(model, scratch, manifest)
        config = ModelConfig.read(folder / CONFIG_NAME)
        if config.kind == "pretrain":
            raise ModelFolderError(f"{label} is a full pre-training model; export its image encoder instead (the "
                                   f"encoder name, e.g. cxr-vit-b, or ecamp.load_pretrain(...).to_encoder()).",
                                   path=folder)
        net = load(LOCAL_DIR_PREFIX + str(folder)).float().eval()
        kind = kind_of(net)
        names, meaning = _outputs(kind, net)
        c, h, w = _input_size(net, kind)
        gen = torch.Generator().manual_seed(seed)
        example = torch.randn(_CHECK_BATCHES[0], c, h, w, generator=gen)
        graph = _Graph(net).eval()
        record: dict[str, Any] = {
            "format": format, "file": _GRAPH[format], "kind": kind, "source": label,
            "opset": None, "inputs": [{"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32"}],
            "outputs": names, "outputs_meaning": meaning,
            "preprocessing": {"pretrained_cfg": dict(config.pretrained_cfg), "ecamp": config.ecamp.to_dict(),
                              "dense": kind in ("segmentation", "detection")},
            "torch_version": torch.__version__, "ecamp_version": __version__,
        }
        if kind == "detection":
            record["postprocess"] = {"decode": "ecamp.models.heads.decode", "nms": "ecamp.models.heads.postprocess",
                                     **{k: net.head_args[k] for k in ("conf_threshold", "iou_threshold",
                                                                       "nms_iou_plus_one", "num_classes")}}
        checks = [example, *(torch.randn(b, c, h, w, generator=gen) for b in _CHECK_BATCHES[1:])]

        def write(tmp: Path) -> None:
            graph_path = tmp / _GRAPH[format]
            if format == "onnx":
                record["opset"] = _write_onnx(graph, example, graph_path, names, opset)
            else:
                _write_torchscript(graph, example, graph_path)
            worst = 0.0
            for x in checks:
                with torch.no_grad():
                    want = [t.float() for t in _as_list(net(x))]
                got = _run_graph(format, graph_path, x)
                if len(got) != len(want) or any(g.shape != t.shape for g, t in zip(got, want, strict=False)):
                    raise ExportParityError(f"The {format} graph of {label} gives outputs of shapes "
                                            f"{[tuple(g.shape) for g in got]} at batch {len(x)}, torch "
                                            f"{[tuple(t.shape) for t in want]}; nothing was written.", path=out)
                worst = max(worst, *(float((g - t).abs().max()) for g, t in zip(got, want, strict=True)))
            record["parity"] = {"max_abs_diff": worst, "atol": atol, "batch_sizes": [len(x) for x in checks],
                                "runtime": "onnxruntime CPUExecutionProvider" if format == "onnx"
                                else "torch.jit.load", "dtype": "float32"}
            logger.info("%s export of %s: max abs difference from torch %.3g (atol %g)", format, label, worst, atol)
            if not worst <= atol:
                raise ExportParityError(f"The {format} graph of {label} differs from torch by up to {worst:.3g} "
                                        f"(> atol {atol:g}) on the same inputs; nothing was written.", path=out)
            record["sha256"] = sha256_file(graph_path)
            shutil.copyfile(folder / CONFIG_NAME, tmp / CONFIG_NAME)
            (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        atomic_folder(Path(out).expanduser(), write)
        return {**record, "out": str(Path(out).expanduser())}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class OnnxModel:
    """A folder :func:`export` wrote in ONNX, run by ONNX Runtime: ``model(x)`` takes ``pixel_values`` [B, 3, H, W]
    (a tensor or an array) and returns torch tensors as the torch model does (a tensor, or the detection maps as
    a list); :meth:`detect` decodes and suppresses the detection maps in Python, as ``DetectionModel.detect``.

    ``providers``: ONNX Runtime's execution providers (default: the CPU's); ``threads``: its intra-op threads
    (default: ONNX Runtime's choice)."""

    def __init__(self, folder: PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        from .config import ModelConfig

        self.folder = Path(folder).expanduser()
        meta = self.folder / "export.json"
        if not meta.is_file():
            raise ModelFolderError(f"{self.folder} has no export.json; write it with `ecamp export --format onnx`.",
                                   path=self.folder)
        self.record = json.loads(meta.read_text(encoding="utf-8"))
        if self.record.get("format") != "onnx":
            raise InvalidArgumentError(f"{self.folder} holds a {self.record.get('format')} export; OnnxModel runs "
                                       f"ONNX exports.")
        self.config = ModelConfig.read(self.folder / "config.json")
        self.kind = self.record["kind"]
        self._open(self.folder / self.record["file"], providers, threads)
        # what ecamp's loaders set on a model, so get_transform / DenseTransform read the same preprocessing
        pcfg = dict(self.config.pretrained_cfg)
        self.pretrained_cfg = pcfg
        self.ecamp_cfg = self.config.ecamp
        self.label_names = list(self.config.label_names or [])

    def _open(self, graph: Path, providers: Sequence[str], threads: int | None) -> None:
        """Load the graph into the runtime (ONNX Runtime here; :class:`ecamp.runtime.OpenVinoModel` overrides)."""
        _, ort = _onnx_modules()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(graph), options, providers=list(providers))

    def _run(self, arr: Any) -> list[Any]:
        """The graph's outputs, as arrays, in ``export.json``'s order."""
        return self.session.run(None, {INPUT_NAME: arr})

    def __call__(self, x: Any) -> torch.Tensor | list[torch.Tensor]:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy() if torch.is_tensor(x) else x
        outs = [torch.from_numpy(o) for o in self._run(arr)]
        return outs if self.kind == "detection" else outs[0]

    def detect(self, x: Any) -> list[dict]:
        """Per image {"boxes" [N, 4] x1, y1, x2, y2 in input pixels, "scores", "labels"} (detection exports)."""
        from .models.heads import YOLOV3_ANCHORS, decode, postprocess

        if self.kind != "detection":
            raise InvalidArgumentError(f"detect() needs a detection export; {self.folder} is a {self.kind} model.")
        post = self.record["postprocess"]
        size = int(self.record["inputs"][0]["shape"][2])
        anchors = [[(w * size / 416, h * size / 416) for w, h in scale] for scale in YOLOV3_ANCHORS]
        return postprocess(decode(self(x), anchors, size, int(post["num_classes"])), post["conf_threshold"],
                           post["iou_threshold"], iou_plus_one=bool(post["nms_iou_plus_one"]))
