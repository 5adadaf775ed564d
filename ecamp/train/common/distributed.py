"""The process group and the device of this process (torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Runtime", "init_distributed", "select_device", "use_deterministic", "setup_runtime", "wrap_ddp",
           "destroy_process_group", "all_reduce_mean", "gather_objects"]

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


def init_distributed() -> tuple[int, int, int]:
    """``(rank, world, local_rank)``; joins the torchrun process group (NCCL on GPUs, gloo on CPUs) if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        # a group opened here is closed at exit at the latest, also when pretrain() or finetune_*() is called from
        # Python and the caller never destroys it (left to static destructors, gloo can abort the process)
        atexit.register(destroy_process_group)
    if world > 1:
        return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def select_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``device``, else this process's GPU, else the CPU; a CUDA device becomes the current one (NCCL needs it)."""
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


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


def setup_runtime(device: str | None = None, *, deterministic: bool = False) -> Runtime:
    """Determinism settings, process group and device of this process: the one setup both training loops use."""
    use_deterministic(deterministic)
    rank, world, local_rank = init_distributed()
    return Runtime(rank, world, local_rank, select_device(device, local_rank))


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else ``model`` itself."""
    if rt.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                               else None)


def destroy_process_group() -> None:
    """Leave the process group if one is open; every entry point calls it in ``finally``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        # free what still references the group (e.g. a model in a reference cycle) while the interpreter is whole:
        # gloo's threads and work left to interpreter shutdown can abort the process there
        gc.collect()


def all_reduce_mean(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mean over the processes, reduced on ``t``'s device (an NCCL group has no CPU backend)."""
    if rt.world == 1:
        return t
    torch.distributed.all_reduce(t)
    return t / rt.world


def gather_objects(obj, rt: Runtime) -> list:
    """Every process's ``obj``, in rank order."""
    if rt.world == 1:
        return [obj]
    gathered: list = [None] * rt.world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
