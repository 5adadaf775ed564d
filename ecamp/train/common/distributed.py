"""The runtime of a training process: rank, world and device (from :mod:`ecamp.distributed`), determinism,
DDP wrapping and the collective helpers both loops use."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

# one process group and device selection for the library (distributed embedding) and both training loops
from ecamp.distributed import init_distributed, select_device

__all__ = ["Runtime", "use_deterministic", "setup_runtime", "wrap_ddp", "gather_objects"]

# the values torch accepts for deterministic cuBLAS (docs: "Reproducibility")
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, local rank and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def use_deterministic(enabled: bool) -> None:
    """Turn on torch's deterministic algorithms (``run.deterministic``, ``--deterministic``); ``False`` leaves the
    process's settings as they are.

    Call it before any CUDA work: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its first handle is made. An op with
    no deterministic CUDA kernel (the backward of bilinear upsampling, which the SR head and the segmentation
    decoder use) warns once and runs as before rather than stopping a run (docs/fidelity.md, Repeatability).
    """
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_DETERMINISTIC:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = _CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def setup_runtime(device: str | None = None, *, seed: int | None = None, deterministic: bool = False) -> Runtime:
    """Determinism settings, process group and device of this process: the one setup both training loops use.
    ``seed``: seed torch's global generator, the same on every rank (fine-tuning: the heads start identical)."""
    use_deterministic(deterministic)
    rank, world, local_rank = init_distributed()
    rt = Runtime(rank, world, local_rank, select_device(device, local_rank))
    if seed is not None:
        torch.manual_seed(seed)
    return rt


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else ``model`` itself."""
    if rt.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                               else None)


def gather_objects(obj, rt: Runtime) -> list:
    """Every process's ``obj``, in rank order."""
    if rt.world == 1:
        return [obj]
    gathered: list = [None] * rt.world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
