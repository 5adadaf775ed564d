"""``python -m ecamp.train pretrain|finetune ...`` (also ``ecamp train ...``): argument parsing only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ..errors import EcampError
from .recipes import HEADS, MODES

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
                       description="Downstream classification, segmentation and detection with the authors' list "
                                   "files and hyper-parameters (configs/finetune/ has a preset per row of their "
                                   "tables). Under torchrun every process runs this command.")
    f.add_argument("--config", default=None, help="preset YAML (configs/finetune/*.yaml); flags override it")
    f.add_argument("--dataset", default=None, help="cls: chestx-ray14, chexpert, rsna, covidx, aptos-2019, "
                                                   "odir-5k, mured, phantom; seg: siim, rsna, riga, phantom-seg; "
                                                   "det: rsna, phantom-det")
    f.add_argument("--fraction", type=int, choices=(1, 10, 100), default=None,
                   help="percent of training labels (default 100)")
    f.add_argument("--data-root", required=True, help="image paths in the lists are relative to this folder")
    f.add_argument("--lists", default=None, help="folder with the list files (default: --data-root)")
    f.add_argument("--output-dir", required=True)
    f.add_argument("--model", default="cxr-vit-b", help="manifest name, hf-hub:..., local-dir:...")
    f.add_argument("--mode", choices=MODES, default=None, help="classification only (default finetune)")
    f.add_argument("--head", choices=HEADS, default=None, help="cls, seg or det (default cls)")
    f.add_argument("--upstream-protocol", action="store_true",
                   help="reproduce the authors' evaluation protocol (selection on the test set where their lists "
                        "do it, their detection metric, SIIM masks not augmented) instead of the fixed one")
    f.add_argument("--seg-decoder", choices=("authors", "pyramid"), default="authors",
                   help="segmentation decoder: the authors' (one map, four up-sampling stages) or a feature pyramid "
                        "over four blocks (forward_intermediates)")
    f.add_argument("--max-steps", type=int, default=None, help="cap the recipe's step count")
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--batch-size", type=int, default=None, help="global batch size (all processes together)")
    f.add_argument("--warmup", type=int, default=None)
    f.add_argument("--eval-every", type=int, default=None, help="optimizer steps between validations (default: "
                                                                "one epoch)")
    f.add_argument("--patience", type=int, default=None, help="validations without improvement before stopping "
                                                              "(0: never)")
    f.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    f.add_argument("--num-workers", type=int, default=4)
    f.add_argument("--device", default=None)
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--no-progress", action="store_true")
    return parser


def _finetune(args: argparse.Namespace) -> int:
    import os

    from .recipes import load_preset, recipe

    preset_run, preset_values = load_preset(args.config) if args.config else ({}, {})
    head = args.head or preset_run.get("head", "cls")
    dataset = args.dataset or preset_run.get("dataset")
    if not dataset:
        raise EcampError("Pass --dataset NAME (or a --config preset that names one).")
    fraction = args.fraction or preset_run.get("fraction", 100)
    mode = args.mode or preset_run.get("mode", "finetune")
    r = recipe(head, dataset.lower(), fraction, mode).replace(**preset_values)
    r = r.replace(lr=args.lr, batch_size=args.batch_size, warmup=args.warmup, eval_every=args.eval_every,
                  patience=args.patience, precision=args.precision,
                  steps=min(r.steps, args.max_steps) if args.max_steps else None)
    common = dict(model_name=args.model, lists=args.lists, recipe=r, upstream_protocol=args.upstream_protocol,
                  num_workers=args.num_workers, device=args.device, seed=args.seed, progress=not args.no_progress)
    if head == "det":
        from .detection import finetune_detection

        metrics = finetune_detection(dataset, fraction, args.data_root, args.output_dir, **common)
    elif head == "seg":
        from .segmentation import finetune_segmentation

        metrics = finetune_segmentation(dataset, fraction, args.data_root, args.output_dir,
                                        decoder=args.seg_decoder, **common)
    else:
        from .downstream import finetune_classification

        metrics = finetune_classification(dataset, fraction, args.data_root, args.output_dir, mode=mode, **common)
    if int(os.environ.get("RANK", "0")) == 0:
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
