"""Processes and devices: torchrun's process group (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and this process's
device. The library's distributed embedding and the training loops share these."""

from __future__ import annotations

import atexit
import gc
import logging
import os

import torch

from .errors import InvalidArgumentError

__all__ = ["init_distributed", "select_device", "destroy_process_group"]

logger = logging.getLogger("ecamp")


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


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``device``; ``"auto"`` or None picks this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else
    Apple's MPS when it is, else the CPU, and logs the choice. A CUDA device becomes the current one (NCCL needs
    it)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            dev, why = torch.device(f"cuda:{local_rank}"), "CUDA is available"
        elif _mps_available():
            dev, why = torch.device("mps"), "no CUDA; Apple's MPS is available"
        else:
            dev, why = torch.device("cpu"), "neither CUDA nor MPS is available"
        logger.info("device: %s (auto: %s)", dev, why)
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from e
        logger.info("device: %s", dev)
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
