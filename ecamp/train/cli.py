"""``python -m ecamp.train pretrain ...`` (also ``ecamp train pretrain ...``): argument parsing only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ..errors import EcampError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecamp train", description="ECAMP training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pretrain", help="pre-train an ECAMP model (run under torchrun for several processes)",
                       description="Pre-train an ECAMP model. Under torchrun every process runs this command.")
    p.add_argument("--config", default=None, help="YAML preset (e.g. configs/pretrain/mimic_cxr.yaml)")
    p.add_argument("--data-root", required=True, help="folder with the reports CSV, windows CSV and images")
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics.jsonl, tokenizer and config go here")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this process's GPU or the CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4")

    f = sub.add_parser("finetune", help="fine-tune or linear-probe an encoder on a downstream task",
                       description="Downstream classification with the authors' list files and recipes.")
    f.add_argument("--dataset", required=True, help="chestx-ray14, chexpert, rsna, covidx, aptos-2019, odir-5k, "
                                                    "mured or phantom")
    f.add_argument("--fraction", type=int, choices=(1, 10, 100), default=100, help="percent of training labels")
    f.add_argument("--data-root", required=True, help="image paths in the lists are relative to this folder")
    f.add_argument("--lists", default=None, help="folder with the list files (default: --data-root)")
    f.add_argument("--output-dir", required=True)
    f.add_argument("--model", default="cxr-vit-b", help="manifest name, hf-hub:..., local-dir:...")
    f.add_argument("--mode", choices=("finetune", "linear-probe"), default="finetune")
    f.add_argument("--head", choices=("cls", "seg", "det"), default="cls")
    f.add_argument("--max-steps", type=int, default=None, help="cap the recipe's step count")
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--warmup", type=int, default=None)
    f.add_argument("--eval-every", type=int, default=None)
    f.add_argument("--num-workers", type=int, default=4)
    f.add_argument("--device", default=None)
    f.add_argument("--no-progress", action="store_true")
    return parser


def _finetune(args: argparse.Namespace) -> int:
    if args.head == "det":
        raise EcampError("--head det: the detection head is not available yet; ecamp.finetune.multiscale_features "
                         "and FeaturePyramid give the features for your own.")
    if args.head == "seg":
        from .segmentation import finetune_segmentation

        kwargs = {k: v for k, v in dict(max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                                        warmup=args.warmup).items() if v is not None}
        metrics = finetune_segmentation(args.dataset, args.fraction, args.data_root, args.output_dir,
                                        model_name=args.model, lists=args.lists, eval_every=args.eval_every,
                                        num_workers=args.num_workers, device=args.device,
                                        progress=not args.no_progress, **kwargs)
        print(json.dumps(metrics))
        return 0
    from .downstream import finetune_classification

    metrics = finetune_classification(args.dataset, args.fraction, args.data_root, args.output_dir,
                                      model_name=args.model, lists=args.lists, mode=args.mode,
                                      max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                                      warmup=args.warmup, eval_every=args.eval_every, num_workers=args.num_workers,
                                      device=args.device, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in metrics.items() if k != "test_per_class"}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come anywhere, also after options: `--output-dir out optim.lr=1e-4`
    stray = [x for x in extra if x.startswith("-") or "=" not in x or args.command != "pretrain"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("ecamp").setLevel(logging.INFO)
    try:
        if args.command == "finetune":
            return _finetune(args)
        from .config import load_config
        from .loop import pretrain

        cfg = load_config(args.config, args.overrides)
        resume = args.resume_from or (True if args.resume else None)
        summary = pretrain(cfg, args.data_root, args.output_dir, max_steps=args.max_steps, resume=resume,
                           device=args.device, progress=not args.no_progress)
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))
        return 0
    except EcampError as e:
        print(f"ecamp train {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
