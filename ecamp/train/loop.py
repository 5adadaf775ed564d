"""The pre-training loop: torchrun/DDP, autocast, gradient accumulation, the authors' schedule, exact resume.

One process per device under ``torchrun`` (NCCL on GPUs, gloo on CPUs; multi-node through torchrun's
rendezvous), or a single process without it. Checkpoints hold everything a resumed run needs to continue the same
sequence of losses: model, optimizer, grad scaler, step, data position and every RNG state. They are written to a
temporary file and renamed, and only the last ``run.keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EcampError
from ..fileio import atomic_write
from .config import PretrainRunConfig
from .data import DataError, PretrainDataset, ResumableSampler, collate_pretrain

__all__ = ["pretrain", "lr_at", "latest_checkpoint", "load_checkpoint", "CHECKPOINT_RE"]

logger = logging.getLogger("ecamp")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})\.pt$")


def lr_at(epoch: float, cfg) -> float:
    """The authors' per-iteration schedule: linear warm-up, then a half-cosine over ``schedule_epochs``."""
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return o.lr * epoch / o.warmup_epochs
    span = max(o.schedule_epochs - o.warmup_epochs, 1e-12)
    progress = min((epoch - o.warmup_epochs) / span, 1.0)  # past the horizon the lr stays at min_lr
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = sorted(p for p in Path(folder).glob("checkpoint-*.pt") if CHECKPOINT_RE.match(p.name))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True`` (it holds only tensors, numbers, strings, lists)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise EcampError(f"{path} is not a readable ecamp training checkpoint: {e}") from e


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                       int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if world > 1:
        return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def select_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``device``, else this process's GPU, else the CPU; a CUDA device becomes the current one (NCCL needs it)."""
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _tokenizer(cfg: PretrainRunConfig, data_root: Path, out: Path, rank: int, world: int):
    from ..text import load_tokenizer, train_tokenizer
    from .data import read_table

    target = out / "tokenizer.json"  # the run folder keeps the tokenizer it used: exports and resumes need it
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        tok = load_tokenizer(path if path.is_absolute() else data_root / path)
        if rank == 0 and not target.is_file():
            atomic_write(target, lambda p: tok.save(str(p)))
        return tok
    if rank == 0 and not target.is_file():
        rows = read_table(data_root / cfg.data.reports_csv, ["report", "llm_output"])
        texts = [r["report"] + " " + (r["llm_output"] or "") for r in rows]
        tok = train_tokenizer(texts, vocab_size=cfg.model.vocab_size)
        atomic_write(target, lambda p: tok.save(str(p)))
    if world > 1:
        torch.distributed.barrier()
    return load_tokenizer(target)


def _init_from(model, source: str) -> None:
    """Initialise encoder (and matching decoder) weights from ImageNet MAE ViT-B/16, by name and shape, as the
    authors' name-filtered load does (dossier 3.7)."""
    from safetensors.torch import load_file

    from ..hub import hub_download, split_hub_spec
    from ..models.pretrain import ECAMPPretrainModel

    if source.startswith("hf-hub:"):
        repo, rev = split_hub_spec(source[len("hf-hub:"):])
        path = hub_download(repo, "model.safetensors", revision=rev)
    else:
        path = Path(source)
    state = load_file(str(path)) if str(path).endswith(".safetensors") else \
        ECAMPPretrainModel.read_upstream_checkpoint(path)
    target = model.state_dict()
    taken = {}
    for key, value in state.items():
        for candidate in (f"encoder.{key}", key):
            if candidate in target and target[candidate].shape == value.shape:
                taken[candidate] = value
                break
    if not any(k.startswith("encoder.blocks.") for k in taken):
        raise EcampError(f"{source} has no ViT encoder weights matching this model (keys like blocks.0.attn.qkv).")
    model.load_state_dict(taken, strict=False)
    logger.info("Initialised %d tensors from %s", len(taken), source)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def pretrain(cfg: PretrainRunConfig, data_root: str | Path, output_dir: str | Path, *, max_steps: int | None = None,
             resume: str | Path | bool | None = None, device: str | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Run (or resume) ECAMP pre-training; returns a summary with the last step and checkpoint path."""
    from tqdm.auto import tqdm

    from ..models.pretrain import ECAMPPretrainModel
    from ..text import ReportEncoder

    cfg.validate()
    data_root, out = Path(data_root), Path(output_dir)
    rank, world, local_rank = init_distributed()
    dev = select_device(device, local_rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if world > 1:
        torch.distributed.barrier()
    seed = cfg.run.seed
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)

    tokenizer = _tokenizer(cfg, data_root, out, rank, world)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise EcampError(f"The tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}.")
    encoder = ReportEncoder(tokenizer, max_length=cfg.model.max_text_len, config=cfg.masking())
    dataset = PretrainDataset(data_root, cfg, encoder, seed=seed)
    bs, accum = cfg.optim.batch_size, cfg.optim.accum_iter
    sampler = ResumableSampler(len(dataset), rank=rank, world_size=world, seed=seed)
    micro_per_epoch = sampler.per_rank // bs
    if micro_per_epoch < accum:
        raise DataError(f"{len(dataset)} samples give {micro_per_epoch} batches of {bs} per process, fewer than "
                        f"accum_iter={accum}; lower optim.batch_size or optim.accum_iter.")
    steps_per_epoch = micro_per_epoch // accum
    total_steps = steps_per_epoch * cfg.optim.epochs

    model = ECAMPPretrainModel(cfg.model)
    if cfg.run.init_from:
        _init_from(model, cfg.run.init_from)
    model.to(dev)
    from timm.optim import param_groups_weight_decay

    # no decay on biases and 1-D parameters (norms); frozen position embeddings are left out, as the authors
    groups = param_groups_weight_decay(model, weight_decay=cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.run.precision == "fp16")
    step, epoch, epoch_pos = 0, 0, 0
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(out) if resume is True or resume == "auto" else Path(resume)
        if ckpt_path is None:
            logger.warning("No checkpoint in %s; starting from scratch.", out)
    elif latest_checkpoint(out) is not None:
        raise EcampError(f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose "
                         f"another --output-dir.")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, epoch_pos = ckpt["step"], ckpt["epoch"], ckpt["epoch_pos"]
        _set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, step, epoch, epoch_pos)
        if rank == 0 and (out / "metrics.jsonl").is_file():  # drop lines written after that checkpoint
            lines = (out / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if world > 1 else model
    writer = None
    if rank == 0 and cfg.run.log == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from ..errors import MissingDependencyError

            raise MissingDependencyError("run.log=tensorboard needs TensorBoard: pip install tensorboard") from e
        writer = SummaryWriter(str(out / "tensorboard"))
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=stop, initial=step, desc="pretrain", unit="step", disable=not (progress and rank == 0))
    bad = seen = 0
    limit = cfg.data.max_bad_samples
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    csv_file = None
    if rank == 0 and cfg.run.log == "csv":
        new = not (out / "metrics.csv").is_file() or ckpt_path is not None
        csv_file = open(out / "metrics.csv", "w" if new else "a", encoding="utf-8")
        if new:
            csv_file.write("step,epoch,loss,mim_loss,sr_loss,mlm_loss,lr\n")
            if ckpt_path is not None:  # rebuild from the kept JSON lines
                for ln in (out / "metrics.jsonl").read_text().splitlines():
                    m = json.loads(ln)
                    csv_file.write(",".join(str(m[k]) for k in ("step", "epoch", "loss", "mim_loss", "sr_loss",
                                                                  "mlm_loss", "lr")) + "\n")
    last_ckpt = ckpt_path
    last_error = ""
    last_inputs: dict[str, torch.Tensor] | None = None
    t_start = time.time()
    try:
        while step < stop:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch, start=epoch_pos * bs)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=bs, sampler=sampler, num_workers=cfg.run.num_workers,
                collate_fn=collate_pretrain, drop_last=True, pin_memory=dev.type == "cuda",
                generator=torch.Generator().manual_seed(seed * 1000 + epoch),
                persistent_workers=False)
            sums = torch.zeros(4, dtype=torch.float64, device=dev)  # on the device: no sync per micro-batch
            micro_in_step = 0
            for batch in loader:
                if epoch_pos >= steps_per_epoch * accum:
                    break
                bad += batch["n_bad"]
                seen += batch["n_bad"] + (batch["image"].shape[0] if "image" in batch else 0)
                if batch["n_bad"]:
                    logger.warning("Skipped %d unreadable sample(s): %s", batch["n_bad"], "; ".join(batch["errors"]))
                    last_error = batch["errors"][-1]
                if micro_in_step == 0:
                    lr = lr_at(epoch + epoch_pos / micro_per_epoch, cfg)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                last_micro = micro_in_step == accum - 1
                usable = "image" in batch
                if usable:
                    inputs = {k: v.to(dev, non_blocking=True) for k, v in batch.items()
                              if isinstance(v, torch.Tensor) and k != "index"}
                    last_inputs = inputs
                elif world > 1 and last_inputs is not None:
                    # every sample of this rank's batch was unreadable: still take part in DDP's gradient
                    # all-reduce (other ranks wait for it) with a zero-weighted pass over the previous batch
                    inputs = last_inputs
                if usable or (world > 1 and last_inputs is not None):
                    sync = contextlib.nullcontext() if (last_micro or world == 1) else ddp.no_sync()
                    with sync:
                        with autocast(dev, cfg.run.precision):
                            outs = ddp(inputs)
                        weight = 1.0 if usable else 0.0
                        scaler.scale(outs["loss"] * weight / accum).backward()
                    if usable:
                        sums += torch.stack([outs[k].detach().double() for k in ("loss", "mim_loss", "sr_loss",
                                                                                  "mlm_loss")])
                micro_in_step += 1
                epoch_pos += 1
                if not last_micro:
                    continue
                if cfg.optim.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                # the bad-sample budget, on global counts so that every rank stops together
                counts = torch.tensor([bad, seen], dtype=torch.float64)
                if world > 1:
                    counts = counts.to(dev)
                    torch.distributed.all_reduce(counts)
                    counts = counts.cpu()
                g_bad, g_seen = int(counts[0]), int(counts[1])
                # a fraction is judged over at least 1,000 samples, so one early bad file does not stop a run
                allowed = limit if limit >= 1 else limit * max(g_seen, 1000)
                if g_bad > allowed:
                    raise DataError(f"{g_bad} of {g_seen} samples could not be read, over data.max_bad_samples="
                                    f"{limit}; last error here: {last_error}")
                micro_in_step = 0
                avg = sums / accum
                if world > 1:  # on the device: an NCCL group has no CPU backend
                    torch.distributed.all_reduce(avg)
                    avg = avg / world
                avg = avg.cpu()  # the one host copy per optimizer step
                sums.zero_()
                if rank == 0:
                    row = {"step": step, "epoch": round(epoch + epoch_pos / micro_per_epoch, 6),
                           "loss": avg[0].item(), "mim_loss": avg[1].item(), "sr_loss": avg[2].item(),
                           "mlm_loss": avg[3].item(), "lr": lr, "skipped": bad,
                           "elapsed_s": round(time.time() - t_start, 3)}
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if csv_file:
                        csv_file.write(",".join(str(row[k]) for k in ("step", "epoch", "loss", "mim_loss", "sr_loss",
                                                                       "mlm_loss", "lr")) + "\n")
                        csv_file.flush()
                    if writer:
                        for k in ("loss", "mim_loss", "sr_loss", "mlm_loss", "lr"):
                            writer.add_scalar(k, row[k], step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                if step % cfg.run.save_every == 0 or step == stop:
                    last_ckpt = _save(out, model, optimizer, scaler, step, epoch, epoch_pos, cfg, rank, world)
                if step >= stop:
                    break
            if step >= stop:
                break
            epoch, epoch_pos = epoch + 1, 0
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if csv_file:
            csv_file.close()
        if writer:
            writer.close()
    return {"step": step, "epoch": epoch, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "total_steps": total_steps, "skipped": bad}


def _save(out: Path, model, optimizer, scaler, step: int, epoch: int, epoch_pos: int, cfg, rank: int,
          world: int) -> Path:
    rng = _rng_state()
    if world > 1:  # every rank's RNG, so each continues its own stream
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, rng)
        rngs = gathered
    else:
        rngs = [rng]
    path = out / f"checkpoint-{step:08d}.pt"
    if rank == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "epoch": epoch, "epoch_pos": epoch_pos, "rng": rngs,
                 "config": json.dumps(cfg.to_dict()), "format": "ecamp-pretrain-1"}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        old = sorted(p for p in out.glob("checkpoint-*.pt") if CHECKPOINT_RE.match(p.name))
        for p in old[: -cfg.run.keep_last]:
            p.unlink()
    if world > 1:
        torch.distributed.barrier()
    return path
