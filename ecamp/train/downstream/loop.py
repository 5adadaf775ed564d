"""The training loop every downstream head shares: DDP, autocast, the authors' optimisers and schedule, periodic
validation with early stopping, the best checkpoint, ``metrics.jsonl``.

Under ``torchrun`` each process trains on its share of every global batch (``recipe.batch_size`` is the global
batch, as in the authors' tables) and evaluates a shard of the validation set; predictions are gathered, so every
rank computes the same metric and takes the same decisions. ``best/`` holds the model of the best validation
score as a folder ``ecamp.load("local-dir:OUT/best")`` reads (each head supplies its writer, ``export``); whether a
tie replaces it, whether the last partial batch trains and when validation starts are
:class:`~ecamp.train.downstream.protocol.Protocol` options (the authors' code differs between heads: their
classification saves ties on AUROC, ``<=``, but not on accuracy, ``<``). Fine-tuning runs are short, so they
restart rather than resume.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecamp.config import EcampCfg, ecamp_cfg_of
from ecamp.errors import DataError, InvalidArgumentError
from ecamp.fileio import atomic_folder, atomic_write
from ecamp.train.common.distributed import Runtime, gather_objects, wrap_ddp
from ecamp.train.common.metrics import MetricsLog
from ecamp.train.common.precision import autocast, grad_scaler
from ecamp.train.common.schedule import warmup_cosine_factor
from ecamp.train.downstream.protocol import Protocol
from ecamp.train.downstream.recipes import Recipe

__all__ = ["Runtime", "evaluate", "train_head", "initial_best", "improves", "replay_selection", "write_metrics",
           "finetuned_block", "export_dense"]

logger = logging.getLogger("ecamp")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, predict: Callable[[nn.Module, Any], list],
             score: Callable[[list], Any], rt: Runtime, *, batch_size: int, num_workers: int = 0,
             collate_fn: Callable | None = None) -> Any:
    """``score`` of all ``predict`` outputs over ``dataset``; each rank predicts a shard, the outputs are gathered.

    ``predict(model, batch)`` returns a list with one entry per sample (e.g. ``(prediction, target)`` pairs on the
    CPU); ``score`` gets them all, in no particular order.
    """
    model.eval()
    shard = torch.utils.data.Subset(dataset, list(range(rt.rank, len(dataset), rt.world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_fn)
    outputs: list = []
    for batch in loader:
        outputs.extend(predict(model, batch))
    return score([o for part in gather_objects(outputs, rt) for o in (part or [])])


def initial_best(protocol: Protocol) -> float:
    """The best score before the first validation: 0 as the authors' (``best_starts_at_zero``, D14), else -inf."""
    return 0.0 if protocol.best_starts_at_zero else float("-inf")


def improves(val: float, best: float, protocol: Protocol) -> bool:
    """Whether a validation score replaces the best checkpoint: above it, or equal with ``save_on_tie`` (D2)."""
    return val > best or (protocol.save_on_tie and val == best)


def replay_selection(scores: Sequence[float], protocol: Protocol, patience: int) -> tuple[int | None, int]:
    """:func:`train_head`'s model selection on a sequence of validation scores: (the index of the selected one,
    None if none was saved; how many validations run before early stopping ends the run)."""
    best, selected, bad = initial_best(protocol), None, 0
    for i, val in enumerate(scores):
        if improves(val, best, protocol):
            best, selected, bad = val, i, 0
        else:
            bad += 1
        if patience and bad >= patience:
            return selected, i + 1
    return selected, len(scores)


def _optimizer(params: Sequence[nn.Parameter], r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=0.9, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, betas=(0.9, 0.999), weight_decay=r.weight_decay)
    raise InvalidArgumentError(f"Unknown optimizer {r.optimizer!r}; use sgd or adamw.")


def _endless(loader: torch.utils.data.DataLoader, sampler: torch.utils.data.Sampler):
    """The loader's batches epoch after epoch (a distributed sampler reshuffles each epoch)."""
    epoch = 0
    while True:
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_head(model: nn.Module, train_set: torch.utils.data.Dataset,
               loss_fn: Callable[[nn.Module, Any, torch.device], torch.Tensor], validate: Callable[[], float],
               recipe: Recipe, rt: Runtime, output_dir: str | Path, *, metric: str, num_workers: int = 0,
               collate_fn: Callable | None = None, seed: int = 42, progress: bool = True,
               desc: str = "finetune", protocol: Protocol | None = None,
               export: Callable[[nn.Module, Path, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``model``'s parameters that require grad; returns a summary and leaves the best weights loaded.

    ``loss_fn(model, batch, device)`` gives the training loss of a batch (``model`` may be wrapped in DDP);
    ``validate()`` scores the current weights on the validation split (higher is better). ``protocol`` supplies
    ``drop_last``, ``save_on_tie``, ``start_eval_strict``, ``scheduler_before_optimizer`` and
    ``best_starts_at_zero`` (default: ecamp's).
    ``export(model, folder, {"step", "val_<metric>"})`` writes the model into a folder; each new best is written
    to a temporary folder that then replaces ``output_dir/best`` (the main process only).
    """
    from ecamp.console import progress_bar

    out = Path(output_dir)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidArgumentError("The model has no trainable parameters.")
    model.to(rt.device)
    if recipe.batch_size % rt.world:
        raise InvalidArgumentError(f"The global batch size {recipe.batch_size} is not divisible by the {rt.world} "
                                   f"processes; pass --batch-size.")
    net = wrap_ddp(model, rt)
    logger.info("Global batch %d (%d per process x %d processes)", recipe.batch_size, recipe.batch_size // rt.world,
                rt.world)
    per_rank = max(1, recipe.batch_size // rt.world)
    proto = protocol or Protocol()
    # never drop the only batch of a split smaller than one global batch
    drop_last = proto.drop_last and len(train_set) >= recipe.batch_size
    if rt.world > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                                      seed=seed, drop_last=drop_last)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=drop_last,
                                         num_workers=num_workers, collate_fn=collate_fn)
    if len(loader) == 0:
        raise DataError(f"The training split has {len(train_set)} samples: too few for {rt.world} processes.")
    opt = _optimizer(params, recipe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_factor(
        recipe.warmup, recipe.steps, scheduler_first=proto.scheduler_before_optimizer))
    scaler = grad_scaler(rt.device, recipe.precision)
    eval_every = recipe.eval_every or len(loader)
    log = MetricsLog(out, enabled=rt.main, fresh=True)
    best = initial_best(proto)  # the authors' 0 (D14): a first score that does not beat it is not saved
    best_state, best_step, bad, step, evaluations = None, 0, 0, 0, 0
    losses: list[float] = []
    bar = progress_bar(total=recipe.steps, desc=desc, unit="step", disable=not progress or not rt.main)
    try:
        for batch in _endless(loader, sampler):
            model.train()
            with autocast(rt.device, recipe.precision):
                loss = loss_fn(net, batch, rt.device)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if proto.scheduler_before_optimizer:  # the authors' order (#36): step k runs at their factor(k)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
                    sched.step()
            scaler.step(opt)
            scaler.update()
            if not proto.scheduler_before_optimizer:
                sched.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            # the last step always validates, so a budget shorter than start_eval still picks weights
            started = step > recipe.start_eval if proto.start_eval_strict else step >= recipe.start_eval
            if (started and step % eval_every == 0) or step == recipe.steps:
                val = validate()
                evaluations += 1
                row = {"step": step, "loss": sum(losses) / len(losses), "lr": sched.get_last_lr()[0],
                       f"val_{metric}": val}
                losses = []
                if improves(val, best, proto):
                    best, best_step, bad = val, step, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if rt.main and export is not None:
                        info = {"step": step, f"val_{metric}": val}
                        atomic_folder(out / "best", lambda tmp, info=info: export(model, tmp, info))
                else:
                    bad += 1
                log.log(row)
                if recipe.patience and bad >= recipe.patience:
                    logger.info("No better validation %s for %d evaluations: stopping at step %d.", metric, bad,
                                step)
                    break
            if step >= recipe.steps:
                break
    finally:
        bar.close()
        log.close()
    if best_state is None and proto.best_starts_at_zero:
        rule = "at least 0" if proto.save_on_tie else "above 0"
        raise DataError(
            f"None of the {evaluations} validation {metric} scores was {rule}, and the authors' best score starts "
            f"at 0 (best_starts_at_zero, D14; Classification/train.py:418, :484/:492, Segmentation/train.py:358, "
            f"Detection/train.py:441): their code would have saved no checkpoint, so its test() would fail to load "
            f"one. Stopped without testing; {out / 'metrics.jsonl'} has the validation scores. Pass --protocol-option "
            f"best_starts_at_zero=false to select the first validation instead.", path=out / "metrics.jsonl")
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"steps_run": step, f"val_{metric}": best, "best_step": best_step,
            "stopped_early": step < recipe.steps}


def finetuned_block(encoder: nn.Module, model_name: str, finetune: dict[str, Any], **fields: Any) -> EcampCfg:
    """The ``ecamp`` block of a fine-tuned model: the encoder's image settings (modality, intensity policy...), the
    model it started from (``base_model``), how it was trained (``finetune``) and ``fields`` (task, activation...)."""
    own = ecamp_cfg_of(encoder)
    return own.replace(name=None, source=None, base_model=own.name or model_name, finetune=dict(finetune), **fields)


def export_dense(model: nn.Module, folder: Path, info: dict[str, Any]) -> None:
    """``train_head``'s ``export`` for segmentation and detection: the model's folder, with the best step and
    validation score under ``ecamp.finetune``."""
    from ecamp.folders import save_pretrained

    block = ecamp_cfg_of(model)
    save_pretrained(model, folder, ecamp_cfg=block.replace(finetune={**block.finetune, **info}))


def write_metrics(rt: Runtime, output_dir: str | Path, metrics: dict[str, Any]) -> None:
    if rt.main:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
