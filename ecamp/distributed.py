"""Processes and devices: torchrun's process group (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and this process's
device. The library's distributed embedding and the training loops share these."""

from __future__ import annotations

import atexit
import gc
import os

import torch

__all__ = ["init_distributed", "select_device", "destroy_process_group"]


def init_distributed() -> tuple[int, int, int]:
    """``(rank, world, local_rank)``; joins the torchrun process group (NCCL on GPUs, gloo on CPUs) if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        # a group opened here is closed at exit at the latest, also when a caller never destroys it (left to
        # static destructors, gloo can abort the process)
        atexit.register(destroy_process_group)
    if world > 1:
        return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def select_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``device``, else this process's GPU when there is one, else the CPU; a CUDA device becomes the current one
    (NCCL needs it)."""
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def destroy_process_group() -> None:
    """Leave the process group if one is open; every entry point that may open one calls this in ``finally``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        # free what still references the group (e.g. a model in a reference cycle) while the interpreter is whole:
        # gloo's threads and work left to interpreter shutdown can abort the process there
        gc.collect()
