"""The pre-training loop: torchrun/DDP, autocast, gradient accumulation, the authors' schedule, exact resume.

One process per device under ``torchrun`` (NCCL on GPUs, gloo on CPUs; multi-node through torchrun's
rendezvous), or a single process without it. Checkpoints hold everything a resumed run needs to continue the same
sequence of losses: model, optimizer, grad scaler, step, data position and every RNG state; only the last
``run.keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecamp.errors import CheckpointError, DataError, InvalidArgumentError, WeightsMismatchError
from ecamp.fileio import atomic_write
from ecamp.train.common.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ecamp.train.common.distributed import Runtime, gather_objects, setup_runtime, wrap_ddp
from ecamp.train.common.metrics import MetricsLog
from ecamp.train.common.precision import autocast, grad_scaler
from ecamp.train.common.schedule import warmup_cosine
from ecamp.train.pretrain.config import PretrainRunConfig
from ecamp.train.pretrain.data import PretrainDataset, ResumableSampler, check_pretrain_data, collate_pretrain

__all__ = ["pretrain", "lr_at", "make_optimizer", "CHECKPOINT_FORMAT"]

logger = logging.getLogger("ecamp")
CHECKPOINT_FORMAT = "ecamp-pretrain-1"
LOSSES = ("loss", "mim_loss", "sr_loss", "mlm_loss")
CSV_COLUMNS = ("step", "epoch", *LOSSES, "lr")


def lr_at(epoch: float, cfg: PretrainRunConfig) -> float:
    """The authors' per-iteration schedule: linear warm-up, then a half-cosine over ``schedule_epochs``."""
    o = cfg.optim
    return warmup_cosine(epoch, o.warmup_epochs, o.schedule_epochs, o.lr, o.min_lr)


def _tokenizer(cfg: PretrainRunConfig, data_root: Path, out: Path, rt: Runtime):
    from ecamp.text import load_tokenizer, train_tokenizer
    from ecamp.train.common.lists import LAYOUT_HINT, read_table

    target = out / "tokenizer.json"  # the run folder keeps the tokenizer it used: exports and resumes need it
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        tok = load_tokenizer(path if path.is_absolute() else data_root / path)
        if rt.main and not target.is_file():
            atomic_write(target, lambda p: tok.save(str(p)))
        return tok
    if rt.main and not target.is_file():
        rows = read_table(data_root / cfg.data.reports_csv, ["report", "llm_output"], missing_hint=LAYOUT_HINT)
        texts = [r["report"] + " " + (r["llm_output"] or "") for r in rows]
        tok = train_tokenizer(texts, vocab_size=cfg.model.vocab_size)
        atomic_write(target, lambda p: tok.save(str(p)))
    if rt.world > 1:
        torch.distributed.barrier()
    return load_tokenizer(target)


def _init_from(model, source: str) -> dict[str, int]:
    """Initialise from ImageNet MAE ViT-B/16 weights by name and shape, as the authors' name-filtered load of their
    ``mae_vit_base.pth`` (dossier 3.7); returns how many encoder and decoder tensors were taken.

    An encoder-only file (timm's ``vit_base_patch16_224.mae``, MAE's ``mae_pretrain_vit_base.pth``) sets the
    encoder. A full MAE checkpoint (``mae_visualize_vit_base.pth``: ``patch_embed.*``, ``blocks.N.*`` and
    ``mask_token``, ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``,
    ``decoder_pred``) sets the decoder too: the MAE repo's decoder names are this model's. Its decoder blocks past
    ``model.decoder_depth`` have no counterpart here and are left out, as in the authors' load.
    """
    from safetensors.torch import load_file

    from ecamp.convert import read_authors_checkpoint
    from ecamp.factory import resolve_files

    path = Path(source)
    if not path.is_file():  # a model name (hf-hub:, a manifest name, a folder): its weights, verified
        path = resolve_files(source, ["model.safetensors"])[1]["model.safetensors"]
    state = load_file(str(path)) if str(path).endswith(".safetensors") else read_authors_checkpoint(path)
    target = model.state_dict()
    taken, mis_shaped = {}, []
    for key, value in state.items():
        for candidate in (f"encoder.{key}", key):
            if candidate in target:
                if target[candidate].shape == value.shape:
                    taken[candidate] = value
                else:
                    mis_shaped.append(f"{key} {tuple(value.shape)} vs {tuple(target[candidate].shape)}")
                break
    if not any(k.startswith("encoder.blocks.") for k in taken):
        raise WeightsMismatchError(f"{source} has no ViT encoder weights matching this model (keys like "
                                   f"blocks.0.attn.qkv).", path=source)
    model.load_state_dict(taken, strict=False)
    counts = {"encoder": sum(k.startswith("encoder.") for k in taken),
              "decoder": sum(k.startswith(("decoder_", "mask_token")) for k in taken)}
    logger.info("Initialised %d tensors from %s (%d encoder, %d decoder)", len(taken), source, counts["encoder"],
                counts["decoder"])
    if mis_shaped:
        logger.warning("Left at their initialisation (shapes differ from %s): %s%s", source, ", ".join(mis_shaped[:6]),
                       f" and {len(mis_shaped) - 6} more" if len(mis_shaped) > 6 else "")
    return counts


class _BadSamples:
    """The budget of unreadable samples, judged on global counts so that every rank stops together."""

    def __init__(self, limit: float):
        self.limit, self.bad, self.seen, self.last_error = limit, 0, 0, ""

    def add(self, batch: dict[str, Any]) -> None:
        self.bad += batch["n_bad"]
        self.seen += batch["n_bad"] + (batch["image"].shape[0] if "image" in batch else 0)
        if batch["n_bad"]:
            logger.warning("Skipped %d unreadable sample(s): %s", batch["n_bad"], "; ".join(batch["errors"]))
            self.last_error = batch["errors"][-1]

    def reduce_and_check(self, losses: torch.Tensor, rt: Runtime) -> torch.Tensor:
        """The mean of ``losses`` over the processes, on the host; the budget's counts ride in the same all-reduce,
        so judging them costs no collective or host synchronisation of its own, and every rank judges the same
        global counts at the same step."""
        if rt.world == 1:
            self._judge(self.bad, self.seen)
            return losses.cpu()
        counts = torch.tensor([self.bad, self.seen], dtype=torch.float64)
        if rt.device.type == "cuda":  # pinned and asynchronous: the only wait is the copy back below
            counts = counts.pin_memory()
        counts = counts.to(rt.device, non_blocking=True)
        both = torch.cat([losses.double(), counts])
        torch.distributed.all_reduce(both)
        both = both.cpu()
        self._judge(int(both[-2]), int(both[-1]))
        return (both[:-2] / rt.world).to(losses.dtype)

    def _judge(self, g_bad: int, g_seen: int) -> None:
        # a fraction is judged over at least 1,000 samples, so one early bad file does not stop a run
        allowed = self.limit if self.limit >= 1 else self.limit * max(g_seen, 1000)
        if g_bad > allowed:
            raise DataError(f"{g_bad} of {g_seen} samples could not be read, over data.max_bad_samples="
                            f"{self.limit}; last error here: {self.last_error}")


def _check_data(cfg: PretrainRunConfig, data_root: Path, rt: Runtime) -> None:
    """Rank 0 checks the data set (CSVs, windows, every image path) and the batch layout it allows; every rank
    raises rank 0's error, so all stop together before the first step."""
    error: Exception | None = None
    if rt.main:
        try:
            n = check_pretrain_data(data_root, cfg.data)
            bs, accum = cfg.optim.batch_size, cfg.optim.accum_iter
            micro = math.ceil(n / rt.world) // bs
            if micro < accum:
                raise DataError(f"{n} samples give {micro} batches of {bs} per process, fewer than accum_iter="
                                f"{accum}; lower optim.batch_size or optim.accum_iter.")
        except Exception as e:  # noqa: BLE001 - whatever stops rank 0 here must stop the other ranks too
            error = e
    if rt.world > 1:
        verdict = gather_objects(None if error is None else (str(error), getattr(error, "path", None)), rt)[0]
        if verdict is not None and not rt.main:
            raise DataError(verdict[0], path=verdict[1])
    if error is not None:
        raise error


@dataclass
class _Position:
    """Where the run is: optimizer step, epoch and micro-batch within the epoch."""

    step: int = 0
    epoch: int = 0
    epoch_pos: int = 0


def _resume_point(out: Path, resume: str | Path | bool | None) -> Path | None:
    if resume:
        path = latest_checkpoint(out) if resume is True or resume == "auto" else Path(resume)
        if path is None:
            logger.warning("No checkpoint in %s; starting from scratch.", out)
        return path
    if latest_checkpoint(out) is not None:
        raise CheckpointError(f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose "
                              f"another --output-dir.", path=out)
    return None


def _restore(path: Path, model, optimizer, scaler, rt: Runtime) -> _Position:
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][min(rt.rank, len(ckpt["rng"]) - 1)])
    pos = _Position(ckpt["step"], ckpt["epoch"], ckpt["epoch_pos"])
    logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, pos.step, pos.epoch, pos.epoch_pos)
    return pos


def _save(out: Path, model, optimizer, scaler, pos: _Position, cfg: PretrainRunConfig, rt: Runtime) -> Path:
    rngs = gather_objects(rng_state(), rt)  # every rank's RNG, so each continues its own stream
    path = out / checkpoint_name(pos.step)
    if rt.main:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": pos.step, "epoch": pos.epoch, "epoch_pos": pos.epoch_pos, "rng": rngs,
                 "config": json.dumps(cfg.to_dict()), "format": CHECKPOINT_FORMAT}
        save_checkpoint(path, state, keep_last=cfg.run.keep_last)
    if rt.world > 1:
        torch.distributed.barrier()
    return path


def _build(cfg: PretrainRunConfig, data_root: Path, out: Path, rt: Runtime):
    """Seeded RNGs, tokenizer, data set, sampler, model, optimizer and scaler of a run."""
    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.text import ReportEncoder

    seed = cfg.run.seed
    torch.manual_seed(seed + rt.rank)
    np.random.seed(seed + rt.rank)
    random.seed(seed + rt.rank)
    tokenizer = _tokenizer(cfg, data_root, out, rt)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise InvalidArgumentError(f"The tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is "
                                   f"{cfg.model.vocab_size}.")
    encoder = ReportEncoder(tokenizer, max_length=cfg.model.max_text_len, config=cfg.masking())
    dataset = PretrainDataset(data_root, cfg, encoder, seed=seed)
    sampler = ResumableSampler(len(dataset), rank=rt.rank, world_size=rt.world, seed=seed)
    model = ECAMPPretrainModel(cfg.model)
    if cfg.run.init_from:
        _init_from(model, cfg.run.init_from)
    model.to(rt.device)
    return dataset, sampler, model, make_optimizer(model, cfg), grad_scaler(rt.device, cfg.run.precision)


def make_optimizer(model: torch.nn.Module, cfg: PretrainRunConfig) -> torch.optim.AdamW:
    """The authors' AdamW: no decay on biases and 1-D parameters (norms), frozen position embeddings left out.

    On CUDA it is the fused kernel (one launch for every tensor instead of a loop of small ones); the update is
    AdamW's to float rounding, which a test checks on the CPU. Elsewhere it is torch's default implementation.
    """
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay=cfg.optim.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=fused or None)


@dataclass
class _Run:
    """Everything one run's epochs share."""

    cfg: PretrainRunConfig
    rt: Runtime
    out: Path
    dataset: Any
    sampler: Any
    model: Any
    ddp: Any
    optimizer: Any
    scaler: Any
    pos: _Position
    stop: int
    micro_per_epoch: int
    steps_per_epoch: int
    budget: _BadSamples
    log: MetricsLog
    bar: Any
    t_start: float
    last_inputs: dict[str, torch.Tensor] | None = None
    last_ckpt: Path | None = None


def pretrain(cfg: PretrainRunConfig, data_root: str | Path, output_dir: str | Path, *, max_steps: int | None = None,
             resume: str | Path | bool | None = None, device: str | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Run (or resume) ECAMP pre-training; returns a summary with the last step and checkpoint path."""
    from ecamp.console import progress_bar

    cfg.validate()
    data_root, out = Path(data_root), Path(output_dir)
    rt = setup_runtime(device, deterministic=cfg.run.deterministic)
    _check_data(cfg, data_root, rt)  # before anything is written: a bad data set leaves nothing to clean up
    ckpt_path = _resume_point(out, resume)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n"))
    if rt.world > 1:
        torch.distributed.barrier()
    dataset, sampler, model, optimizer, scaler = _build(cfg, data_root, out, rt)
    bs, accum = cfg.optim.batch_size, cfg.optim.accum_iter
    micro_per_epoch = sampler.per_rank // bs
    steps_per_epoch = micro_per_epoch // accum
    total_steps = steps_per_epoch * cfg.optim.epochs
    pos = _restore(ckpt_path, model, optimizer, scaler, rt) if ckpt_path is not None else _Position()
    logger.info("Global batch %d (optim.batch_size %d per process x %d processes x accum_iter %d)",
                bs * rt.world * accum, bs, rt.world, accum)
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    log = MetricsLog(out, enabled=rt.main, sink=cfg.run.log if cfg.run.log in ("csv", "tensorboard") else None,
                     columns=CSV_COLUMNS, resume_step=pos.step if ckpt_path is not None else None)
    bar = progress_bar(total=stop, initial=pos.step, desc="pretrain", unit="step",
                       disable=not (progress and rt.main))
    run = _Run(cfg, rt, out, dataset, sampler, model, _compiled(wrap_ddp(model, rt), cfg), optimizer, scaler, pos, stop,
               micro_per_epoch, steps_per_epoch, _BadSamples(cfg.data.max_bad_samples), log, bar, time.time(),
               last_ckpt=ckpt_path)
    try:
        while pos.step < stop:
            _epoch(run)
            if pos.step >= stop:
                break
            pos.epoch, pos.epoch_pos = pos.epoch + 1, 0
    finally:
        bar.close()
        log.close()
    return {"step": pos.step, "epoch": pos.epoch, "checkpoint": str(run.last_ckpt) if run.last_ckpt else None,
            "total_steps": total_steps, "skipped": run.budget.bad}


def _compiled(module: torch.nn.Module, cfg: PretrainRunConfig) -> torch.nn.Module:
    """``module`` under torch.compile when ``run.compile`` is set. Only the callable is compiled: checkpoints and
    exports keep reading the plain model, so their keys carry no ``_orig_mod.`` prefix."""
    if not cfg.run.compile:
        return module
    return torch.compile(module)


def _epoch(run: _Run) -> None:
    """The rest of one epoch from ``run.pos``."""
    cfg, rt, pos, model, optimizer, scaler = run.cfg, run.rt, run.pos, run.model, run.optimizer, run.scaler
    bs, accum, seed = cfg.optim.batch_size, cfg.optim.accum_iter, cfg.run.seed
    run.dataset.set_epoch(pos.epoch)
    run.sampler.set_epoch(pos.epoch, start=pos.epoch_pos * bs)
    loader = torch.utils.data.DataLoader(
        run.dataset, batch_size=bs, sampler=run.sampler, num_workers=cfg.run.num_workers,
        collate_fn=collate_pretrain, drop_last=True, pin_memory=rt.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed * 1000 + pos.epoch), persistent_workers=False)
    sums = torch.zeros(len(LOSSES), dtype=torch.float64, device=rt.device)  # on the device: no sync per micro-batch
    micro_in_step, lr = 0, 0.0
    for batch in loader:
        if pos.epoch_pos >= run.steps_per_epoch * accum:
            break
        run.budget.add(batch)
        if micro_in_step == 0:
            lr = lr_at(pos.epoch + pos.epoch_pos / run.micro_per_epoch, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
        last_micro = micro_in_step == accum - 1
        usable = "image" in batch
        if usable:
            run.last_inputs = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()
                               if isinstance(v, torch.Tensor) and k != "index"}
        if usable or (rt.world > 1 and run.last_inputs is not None):
            # a rank whose whole batch was unreadable still joins DDP's gradient all-reduce (the other ranks wait
            # for it) with a zero-weighted pass over its previous batch
            sync = contextlib.nullcontext() if (last_micro or rt.world == 1) else run.ddp.no_sync()
            with sync:
                with autocast(rt.device, cfg.run.precision):
                    outs = run.ddp(run.last_inputs)
                scaler.scale(outs["loss"] * (1.0 if usable else 0.0) / accum).backward()
            if usable:
                sums += torch.stack([outs[k].detach().double() for k in LOSSES])
        micro_in_step += 1
        pos.epoch_pos += 1
        if not last_micro:
            continue
        if cfg.optim.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        micro_in_step = 0
        avg = run.budget.reduce_and_check(sums / accum, rt)  # the one collective and host copy per optimizer step
        sums.zero_()
        if rt.main:
            row = {"step": pos.step, "epoch": round(pos.epoch + pos.epoch_pos / run.micro_per_epoch, 6),
                   **{k: avg[i].item() for i, k in enumerate(LOSSES)}, "lr": lr, "skipped": run.budget.bad,
                   "elapsed_s": round(time.time() - run.t_start, 3)}
            run.log.log(row)
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{row['loss']:.4f}")
        if pos.step % cfg.run.save_every == 0 or pos.step == run.stop:
            run.last_ckpt = _save(run.out, model, optimizer, scaler, pos, cfg, rt)
        if pos.step >= run.stop:
            break
