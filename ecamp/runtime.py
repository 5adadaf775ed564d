"""CPU runtimes for ``ecamp embed`` and ``ecamp predict``: torch, ONNX Runtime or OpenVINO on one exported graph.

:func:`prepare` resolves a runtime name and builds the callable that runs a loaded model's forward pass: the model
itself for ``"torch"``; for ``"onnxruntime"`` and ``"openvino"``, the ONNX graph :func:`ecamp.export.export`
writes (with its parity check against torch), exported once per weights into a cache folder and reused. The
callable takes ``pixel_values`` [B, 3, H, W] and gives what the torch model gives (an encoder's pooled embedding, a
classifier's logits, mask logits, or the raw detection maps with ``.detect``), so the readers, batching and outputs
of :mod:`ecamp.embedding` and :mod:`ecamp.predict` stay the same for every runtime.

Precision: ONNX Runtime runs the graph in float32. OpenVINO runs it in float32 unless ``dtype`` asks for bfloat16
or float16 (its ``INFERENCE_PRECISION_HINT``; a CPU without native bf16 emulates it slowly). ``"auto"`` (the
CLI's default; :func:`resolve_runtime`) picks OpenVINO in bfloat16 on a CPU that computes bf16 natively (AMX or
AVX512-BF16) when the ``openvino`` extra is installed, unless float32 is asked for, and torch otherwise: on a
ViT-B/16 it measured 3.9 to 5.2 times torch's float32 speed with embeddings at cosine >= 0.9999 to torch's and
linear-probe AUROC within 0.002, random and trained weights (BENCHMARKS.md); every other CPU runtime measured either
under twice torch's speed or under 0.999 in cosine. OpenVINO's own default precision on such a CPU is bfloat16
too. ``auto`` falls back to torch, with a warning, when the export fails. The Python functions default to
``"torch"``, float32, bit-for-bit the model's own forward.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError, MissingDependencyError
from .export import OnnxModel

__all__ = ["RUNTIMES", "Prepared", "prepare", "runtime_model", "resolve_runtime", "OpenVinoModel",
           "runtime_cache_dir"]

logger = logging.getLogger("ecamp")

# what embed and predict accept; "auto" is resolved by resolve_runtime
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
_OV_PRECISION = {None: "f32", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def runtime_cache_dir() -> Path:
    """Where exported graphs are kept: ``runtimes/`` in ecamp's own data folder (:func:`ecamp.hub.ecamp_home`:
    ``$ECAMP_HOME``, default ``~/.cache/ecamp``)."""
    from .hub import ecamp_home

    return ecamp_home() / "runtimes"


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError(f"--runtime openvino needs the openvino extra ({e.name} is missing): "
                                     f"pip install \"ecamp[openvino]\"") from e
    return openvino


@functools.lru_cache(maxsize=1)
def _has_openvino_bf16() -> bool:
    """Whether OpenVINO is installed (with the ONNX export stack) and the CPU computes bf16 natively."""
    try:
        import onnx  # noqa: F401 - the export needs them too
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_runtime(runtime: str, device: torch.device | str, dtype: torch.dtype | None
                    ) -> tuple[str, torch.dtype | None]:
    """``(runtime, dtype)`` to run with: ``runtime`` checked, ``"auto"`` resolved (module docstring).

    The graph runtimes run on the CPU only, ONNX Runtime in float32 only; either mismatch is refused here, before
    anything is loaded or exported."""
    if runtime not in RUNTIMES:
        raise InvalidArgumentError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}.")
    device = torch.device(device)
    if runtime == "auto":
        if device.type == "cpu" and dtype in (None, torch.bfloat16) and _has_openvino_bf16():
            return "openvino", torch.bfloat16
        runtime = "torch"
    if runtime == "torch":
        return "torch", None if dtype == torch.float32 else dtype  # float32 is torch's own forward, no autocast
    if runtime != "torch" and device.type != "cpu":
        raise InvalidArgumentError(f"--runtime {runtime} runs on the CPU; pass --device cpu, or --runtime torch to "
                                   f"run on {device}.")
    if runtime == "onnxruntime" and dtype not in (None, torch.float32):
        raise InvalidArgumentError(f"--runtime onnxruntime runs the graph in float32, not {dtype}; drop --dtype, or "
                                   f"use --runtime openvino (bfloat16 on CPUs that have it) or torch.")
    return runtime, dtype


def _exported(model: nn.Module, cache_dir: Path | None) -> Path:
    """The ONNX export of ``model`` in the cache, written (and parity-checked) on first use. The key is the sha256
    of the model's saved folder (config.json and weights) and of the versions that write the graph."""
    import tempfile

    from .export import DEFAULT_OPSET, export
    from .fileio import sha256_file
    from .folders import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
    from .version import __version__

    with tempfile.TemporaryDirectory(prefix="ecamp-runtime-") as tmp:
        save_pretrained(model, tmp)
        h = hashlib.sha256(json.dumps([sha256_file(Path(tmp) / WEIGHTS_NAME), torch.__version__, __version__,
                                       DEFAULT_OPSET]).encode())
        h.update((Path(tmp) / CONFIG_NAME).read_bytes())
        folder = (cache_dir or runtime_cache_dir()) / h.hexdigest()[:32]
        if not (folder / "export.json").is_file():
            logger.info("exporting the model to ONNX once, into %s (checked against torch)", folder)
            mine = folder.with_name(f".{folder.name}.{os.getpid()}")
            export(tmp, mine, format="onnx")
            try:  # processes exporting the same weights at once (torchrun): the first rename wins
                os.rename(mine, folder)
            except OSError:
                if not (folder / "export.json").is_file():
                    raise
            finally:
                shutil.rmtree(mine, ignore_errors=True)
    return folder


class OpenVinoModel(OnnxModel):
    """A folder :func:`ecamp.export.export` wrote in ONNX, compiled by OpenVINO for the CPU; called and decoded as
    :class:`~ecamp.export.OnnxModel`. ``precision``: ``"f32"``, ``"bf16"`` or ``"f16"`` (OpenVINO's inference
    precision); ``threads``: its inference threads (default: OpenVINO's choice)."""

    def __init__(self, folder: str | os.PathLike, *, precision: str = "f32", threads: int | None = None):
        if precision not in ("f32", "bf16", "f16"):
            raise InvalidArgumentError(f"precision {precision!r}: use f32, bf16 or f16.")
        self.precision = precision
        super().__init__(folder, threads=threads)

    def _open(self, graph: Path, providers: Sequence[str], threads: int | None) -> None:
        ov = _openvino()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(str(graph), "CPU", config)

    def _run(self, arr: Any) -> list[Any]:
        result = self.compiled(arr)
        return [result[out] for out in self.compiled.outputs]


def runtime_model(model: nn.Module, runtime: str = "torch", *, dtype: torch.dtype | None = None,
                  cache_dir: str | os.PathLike | None = None, threads: int | None = None) -> Any:
    """The callable that runs ``model``'s forward pass on ``runtime`` (``"torch"``, ``"onnxruntime"`` or
    ``"openvino"``; resolve ``"auto"`` with :func:`resolve_runtime` first): ``model`` itself for torch, else an
    :class:`~ecamp.export.OnnxModel` or :class:`OpenVinoModel` of its cached ONNX export (``cache_dir``, default
    :func:`runtime_cache_dir`). ``dtype``: OpenVINO's inference precision (float32 when None)."""
    if runtime == "torch":
        return model
    if runtime not in RUNTIMES or runtime == "auto":
        raise InvalidArgumentError(f"runtime {runtime!r}: use torch, onnxruntime or openvino (resolve 'auto' with "
                                   f"ecamp.runtime.resolve_runtime).")
    if runtime == "openvino":
        _openvino()  # a missing extra is said before the export
    folder = _exported(model, Path(cache_dir).expanduser() if cache_dir else None)
    if runtime == "onnxruntime":
        if dtype not in (None, torch.float32):
            raise InvalidArgumentError(f"--runtime onnxruntime runs in float32, not {dtype}.")
        return OnnxModel(folder, threads=threads)
    if dtype not in _OV_PRECISION:
        raise InvalidArgumentError(f"--runtime openvino runs in float32, bfloat16 or float16, not {dtype}.")
    return OpenVinoModel(folder, precision=_OV_PRECISION[dtype], threads=threads)


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` resolved and built: ``forward`` is the model itself for torch (run under autocast of
    ``dtype``), else the graph runtime's callable (it runs at ``dtype`` on its own)."""

    runtime: str
    dtype: torch.dtype | None
    forward: Any

    @property
    def graph(self) -> bool:
        return self.runtime != "torch"

    def describe(self) -> str:
        """``"openvino bfloat16"``, ``"torch float32"``: for the commands' summary lines."""
        return f"{self.runtime} {str(self.dtype or torch.float32).removeprefix('torch.')}"


def prepare(model: nn.Module, runtime: str, device: torch.device | str, dtype: torch.dtype | None, *,
            cache_dir: str | os.PathLike | None = None) -> Prepared:
    """:func:`resolve_runtime`, then :func:`runtime_model`. Where ``runtime`` is ``"auto"`` and the export or
    the graph runtime fails, the model runs in torch at ``dtype`` and a warning says why; a runtime named
    explicitly raises instead."""
    resolved, rdtype = resolve_runtime(runtime, device, dtype)
    try:
        forward = runtime_model(model, resolved, dtype=rdtype, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - auto's promise is to run; the explicit runtime shows the error
        if runtime != "auto" or resolved == "torch":
            raise
        logger.warning("--runtime auto: %s could not run this model (%s: %s); running it in torch instead. "
                       "Pass --runtime %s to see the error, or --runtime torch to skip the export.",
                       resolved, type(e).__name__, str(e)[:300], resolved)
        resolved, rdtype = resolve_runtime("torch", device, dtype)
        forward = model
    return Prepared(resolved, rdtype, forward)
