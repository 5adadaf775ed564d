"""``ecamp train <command>`` (also ``python -m ecamp.train``): the training commands; argument parsing only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ecamp.console import run_command
from ecamp.errors import InvalidArgumentError
from ecamp.train.downstream.recipes import HEADS, MODES

__all__ = ["main", "build_parser"]


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ecamp.train.presets import preset_path
    from ecamp.train.pretrain.config import load_config
    from ecamp.train.pretrain.loop import pretrain

    cfg = load_config(preset_path(args.config, "pretrain") if args.config else None, args.overrides)
    resume = args.resume_from or (True if args.resume else None)
    summary = pretrain(cfg, args.data_root, args.output_dir, max_steps=args.max_steps, resume=resume,
                       device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from ecamp.train.presets import list_presets

    for kind, names in list_presets(args.kind).items():
        print(f"{kind}:")
        for name in names:
            print(f"  {name}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from ecamp.train.downstream.protocol import parse_protocol_options
    from ecamp.train.downstream.recipes import load_preset, recipe
    from ecamp.train.presets import preset_path

    preset_run, preset_values = load_preset(preset_path(args.config, "finetune")) if args.config else ({}, {})
    head = args.head or preset_run.get("head", "cls")
    dataset = args.dataset or preset_run.get("dataset")
    if not dataset:
        raise InvalidArgumentError("Pass --dataset NAME (or a --config preset that names one).")
    fraction = args.fraction or preset_run.get("fraction", 100)
    mode = args.mode or preset_run.get("mode", "finetune")
    r = recipe(head, dataset.lower(), fraction, mode).replace(**preset_values)
    r = r.replace(lr=args.lr, batch_size=args.batch_size, warmup=args.warmup, eval_every=args.eval_every,
                  patience=args.patience, precision=args.precision,
                  steps=min(r.steps, args.max_steps) if args.max_steps else None)
    options = parse_protocol_options(args.protocol_option or [])
    if args.precision:  # an explicit --precision wins over the protocol's (the authors' fp16)
        options.setdefault("precision", args.precision)
    own = [f for f, v in (("--labels", args.labels), ("--label-names", args.label_names),
                          ("--label-type", args.label_type), ("--val-fraction", args.val_fraction),
                          ("--test-fraction", args.test_fraction), ("--group-column", args.group_column))
           if v is not None]
    if own and (head != "cls" or dataset.lower() != "custom"):
        raise InvalidArgumentError(f"{', '.join(own)} describe your own data: pass them with --dataset custom "
                                   f"(classification).")
    cls_only = [f for f, v in (("--pos-weight", args.pos_weight), ("--class-weights", args.class_weights),
                               ("--calibration", args.calibration), ("--operating-point", args.operating_point))
                if v is not None]
    if cls_only and head != "cls":
        raise InvalidArgumentError(f"{', '.join(cls_only)} belong to classification (--head cls).")
    common = dict(model_name=args.model, lists=args.lists, recipe=r, authors_protocol=args.authors_protocol,
                  protocol=options,
                  num_workers=args.num_workers, device=args.device, seed=args.seed, progress=not args.no_progress,
                  deterministic=args.deterministic)
    if head == "det":
        from ecamp.train.downstream.detection import finetune_detection

        metrics = finetune_detection(dataset, fraction, args.data_root, args.output_dir, **common)
    elif head == "seg":
        from ecamp.train.downstream.segmentation import finetune_segmentation

        metrics = finetune_segmentation(dataset, fraction, args.data_root, args.output_dir,
                                        decoder=args.seg_decoder, **common)
    else:
        from ecamp.train.downstream.classification import finetune_classification

        cls_options = dict(calibration=args.calibration or "auto", operating_point=args.operating_point or "youden",
                           pos_weight=_weights(args.pos_weight, "--pos-weight"),
                           class_weights=_weights(args.class_weights, "--class-weights"))
        if dataset.lower() == "custom":
            from pathlib import Path

            from ecamp.train.downstream.custom import CustomSpec, finetune_custom

            custom = CustomSpec(Path(args.data_root), labels_csv=Path(args.labels) if args.labels else None,
                                lists=Path(args.lists) if args.lists else None,
                                label_names=tuple(n.strip() for n in (args.label_names or "").split(",") if n.strip()),
                                label_type=args.label_type or "auto", val_fraction=args.val_fraction or 0.1,
                                test_fraction=args.test_fraction or 0.2, group_column=args.group_column)
            common.pop("lists")  # the spec has them
            metrics = finetune_custom(custom, fraction, args.output_dir, mode=mode, **cls_options, **common)
        else:
            metrics = finetune_classification(dataset, fraction, args.data_root, args.output_dir, mode=mode,
                                              **cls_options, **common)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "test_per_class"}))
    return 0


def _weights(text: str | None, flag: str) -> str | list[float] | None:
    """auto, none, or comma-separated numbers (one per label)."""
    if text is None or text in ("auto", "none"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes auto, none or comma-separated numbers, got {text!r}.") from None


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ecamp.train import phantom

    writer = {"pretrain": phantom.write_phantom, "classification": phantom.write_phantom_classification,
              "segmentation": phantom.write_phantom_segmentation, "detection": phantom.write_phantom_detection}
    extra = {}
    if args.kind == "pretrain":
        extra = {"report": args.report, "one_of": tuple(f for f in (args.one_of or "").split(",") if f)}
        if args.p_finding is not None:
            extra["p_finding"] = args.p_finding
    elif args.report != "full" or args.one_of or args.p_finding is not None:
        raise InvalidArgumentError("--report, --one-of and --p-finding shape pre-training phantoms (--kind pretrain).")
    root = writer[args.kind](args.out, args.n, seed=args.seed, size=args.size, progress=not args.no_progress,
                             **extra)
    print(f"wrote {args.n} phantom cases to {root}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ecamp.train.pretrain.export import export_authors, export_checkpoint

    if args.format == "authors":
        if args.name or args.hf_repo or args.tokenizer or args.manifest:
            raise InvalidArgumentError("--format authors writes the authors' .pth alone; --name, --hf-repo, "
                                       "--tokenizer and --manifest belong to --format ecamp.")
        print(json.dumps(export_authors(args.checkpoint, args.out), indent=2))
        return 0
    if not args.name:
        raise InvalidArgumentError("--format ecamp needs --name, the encoder's manifest name (e.g. cxr-vit-b).")
    result = export_checkpoint(args.checkpoint, args.out, args.name, hf_repo=args.hf_repo, tokenizer=args.tokenizer,
                               manifest=args.manifest)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from ecamp.train.pretrain.distill import OpenAIBackend, TransformersBackend, distill, merge_context

    if args.action == "merge":
        if not (args.images and args.context and args.out):
            raise InvalidArgumentError("`ecamp train distill merge` needs --images, --context and --out.")
        counts = merge_context(args.images, args.context, args.out)
        print(f"wrote {counts['rows']} rows ({counts['with_context']} with context) to {args.out}")
        return 0
    if not (args.reports and args.out and args.model):
        raise InvalidArgumentError("`ecamp train distill` needs --reports, --out and --model.")
    if args.backend == "openai":
        if not args.base_url:
            raise InvalidArgumentError("--backend openai needs --base-url, e.g. http://localhost:8000/v1")
        backend = OpenAIBackend(args.base_url, args.model, api_key_env=args.api_key_env, timeout=args.timeout,
                                allow_remote=args.allow_remote_llm,
                                reports_credentialed=not args.reports_not_credentialed, modality=args.modality)
    else:
        backend = TransformersBackend(args.model, batch_size=args.batch_size, device=args.device)
    summary = distill(args.reports, args.out, backend, modality=args.modality, concurrency=args.concurrency,
                      max_retries=args.max_retries, progress=not args.no_progress)
    for line in summary.lines():
        print(line)
    return 1 if summary.failed else 0


def _cmd_sr_windows(args: argparse.Namespace) -> int:
    from ecamp.train.pretrain.sr_windows import compute_windows

    counts = compute_windows(args.checkpoint, args.data, args.out, reports_csv=args.reports_csv,
                             batch_size=args.batch_size, device=args.device, method=args.method, query=args.query,
                             save_maps=args.save_maps, n_maps=args.n_maps, progress=not args.no_progress)
    print(f"{counts['windows']} windows by {args.method}, {counts['no_entity']} reports without an entity "
          f"(left to data.default_window), written to {args.out}"
          + (f"; pictures in {args.save_maps}" if args.save_maps else ""))
    return 0


class _DeprecatedFlag(argparse.Action):
    """A store-true flag kept under an old name: it sets ``dest`` as the new flag does, with a one-line warning."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}.", file=sys.stderr)
        setattr(namespace, self.dest, True)


def build_parser() -> argparse.ArgumentParser:
    # long but flat: one declaration per option, read top to bottom like --help
    parser = argparse.ArgumentParser(prog="ecamp train", description="ECAMP training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=kw.pop("description", help), **kw)
        p.set_defaults(func=fn)
        return p

    p = sub.add_parser("pretrain", help="pre-train an ECAMP model (run under torchrun for several processes)",
                       description="Pre-train an ECAMP model. Under torchrun every process runs this command. "
                                   "optim.batch_size is per process, as the authors' (global batch = "
                                   "optim.batch_size x processes x optim.accum_iter, logged at the start); "
                                   "`ecamp train finetune --batch-size` is global.")
    p.set_defaults(func=_cmd_pretrain)
    p.add_argument("--config", default=None, help="preset name (mimic_cxr, ffa_ir, phantom_tiny: `ecamp train "
                                                  "presets`) or a YAML file")
    p.add_argument("--data-root", required=True, help="folder with the reports CSV, windows CSV and images")
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics.jsonl, tokenizer and config go here")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this process's GPU or the CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4 or "
                                                                      "optim.batch_size=64 (per process)")

    f = sub.add_parser("finetune", help="fine-tune or linear-probe an encoder on a downstream task",
                       description="Downstream classification, segmentation and detection with the authors' list "
                                   "files and hyper-parameters (`ecamp train presets` lists a preset per row of "
                                   "their tables). Under torchrun every process runs this command.")
    f.set_defaults(func=_finetune)
    f.add_argument("--config", default=None, help="preset name (e.g. cls_chexpert_10_linear-probe) or a YAML "
                                                  "file; flags override it")
    f.add_argument("--dataset", default=None, help="cls: chestx-ray14, chexpert, rsna, covidx, aptos-2019, "
                                                   "odir-5k, mured, spinexr, phantom, or custom (your own class "
                                                   "folders, labels CSV or lists: docs/own-data.md); seg: siim, "
                                                   "rsna, riga, phantom-seg; det: rsna, phantom-det")
    f.add_argument("--fraction", type=int, choices=(1, 10, 100), default=None,
                   help="percent of training labels (default 100)")
    f.add_argument("--data-root", required=True, help="image paths in the lists are relative to this folder")
    f.add_argument("--lists", default=None, help="folder with the list files (default: --data-root)")
    f.add_argument("--output-dir", required=True)
    f.add_argument("--model", default="cxr-vit-b", help="manifest name, hf-hub:..., local-dir:...")
    f.add_argument("--mode", choices=MODES, default=None, help="classification only (default finetune)")
    f.add_argument("--head", choices=HEADS, default=None, help="cls, seg or det (default cls)")
    f.add_argument("--authors-protocol", action="store_true",
                   help="the authors' downstream behaviour for every protocol option (docs/fidelity.md, "
                        "'Downstream'): selection on the test set where their lists do it, raw block tokens, "
                        "their resize, SIIM negatives, NMS and detection metric, fp16...; metrics.json lists the set")
    f.add_argument("--upstream-protocol", action=_DeprecatedFlag, dest="authors_protocol", new="--authors-protocol",
                   help=argparse.SUPPRESS)
    f.add_argument("--protocol-option", action="append", default=None, metavar="NAME=VALUE",
                   help="set one protocol option on top of the default (or --authors-protocol) set, e.g. "
                        "drop_last=true or dense_tokens=raw-block; repeatable")
    f.add_argument("--seg-decoder", choices=("authors", "pyramid"), default="authors",
                   help="segmentation decoder: the authors' (one map, four up-sampling stages) or a feature pyramid "
                        "over four blocks (forward_intermediates)")
    g = f.add_argument_group("your own data (--dataset custom)")
    g.add_argument("--labels", default=None, metavar="CSV",
                   help="a labels CSV with a header: path (relative to --data-root), optional split (train, val, "
                        "test), and label (class names) or one 0/1 column per label; without --labels and --lists, "
                        "the folders under --data-root are the classes")
    g.add_argument("--label-names", default=None, metavar="A,B,...",
                   help="the label columns of --lists files in order (needed there), or the classes and their order "
                        "for --labels")
    g.add_argument("--label-type", choices=("auto", "multi-label", "multi-class"), default=None,
                   help="auto (default): label column and class folders are multi-class, 0/1 columns multi-label; "
                        "multi-class reads one-hot 0/1 columns as classes")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="share of the images for validation when the data has no split (default 0.1)")
    g.add_argument("--test-fraction", type=float, default=None,
                   help="share of the images for the test when the data has no split (default 0.2)")
    g.add_argument("--group-column", default=None, metavar="COLUMN",
                   help="a --labels column naming each image's patient (or study): ecamp's split draws whole "
                        "groups (the fractions count groups), and a given split may not put one group in two splits")
    g = f.add_argument_group("classification: imbalance, calibration and decisions")
    g.add_argument("--pos-weight", default=None, metavar="auto|none|W1,W2,...",
                   help="multi-label: weight each label's positives in the BCE loss; auto: negatives / positives of "
                        "the training split (default none, as the authors)")
    g.add_argument("--class-weights", default=None, metavar="auto|none|W1,W2,...",
                   help="multi-class: cross-entropy class weights; auto: N / (classes x images of the class) on the "
                        "training split (default none)")
    g.add_argument("--calibration", choices=("auto", "temperature", "platt", "none"), default=None,
                   help="fitted on the validation split after training and stored in best/config.json: auto "
                        "(default) is one temperature for multi-class, Platt scaling per label for multi-label")
    g.add_argument("--operating-point", default=None, metavar="RULE",
                   help="per-label decision thresholds fitted on the validation split: youden (default), "
                        "sensitivity=0.9 or specificity=0.95")
    f.add_argument("--max-steps", type=int, default=None, help="cap the recipe's step count")
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--batch-size", type=int, default=None,
                   help="global batch size, all processes together (each takes its share; logged at the start); "
                        "pre-training's optim.batch_size is per process instead")
    f.add_argument("--warmup", type=int, default=None)
    f.add_argument("--eval-every", type=int, default=None, help="optimizer steps between validations (default: "
                                                                "one epoch)")
    f.add_argument("--patience", type=int, default=None, help="validations without improvement before stopping "
                                                              "(0: never)")
    f.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    f.add_argument("--num-workers", type=int, default=4)
    f.add_argument("--device", default=None)
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms (for GPUs; ops without a deterministic CUDA kernel then "
                        "raise); on the CPU the same inputs and seed repeat a run without it")
    f.add_argument("--no-progress", action="store_true")

    p = add("presets", _cmd_presets, "list the presets shipped with ecamp (pass a name to --config)")
    p.add_argument("kind", nargs="?", choices=("pretrain", "finetune"), default=None)

    p = add("export", _cmd_export, "export a training checkpoint: encoder (timm format) and full pre-training "
                                   "model, or the authors' .pth format (--format authors)")
    p.add_argument("checkpoint", help="checkpoint-*.pt, or a run's output folder (its latest checkpoint)")
    p.add_argument("--format", choices=("ecamp", "authors"), default="ecamp",
                   help="ecamp: folders OUT/encoder and OUT/pretrain; authors: OUT is a .pth file holding "
                        "{'model': state_dict} under the authors' key names, which their Fine-tuning scripts and "
                        "`ecamp convert` read; the model sizes go beside it (X.pth -> X.config.json, for "
                        "`ecamp convert --config`)")
    p.add_argument("--out", required=True, help="a folder (--format ecamp) or a .pth file (--format authors)")
    p.add_argument("--name", default=None, help="the encoder's manifest name, e.g. cxr-vit-b (--format ecamp)")
    p.add_argument("--hf-repo", default=None, help="the Hub repo it will be published as (default: the manifest's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    p.add_argument("--manifest", default=None, help="another weights manifest")

    p = add("distill", _cmd_distill, "entity-centred context for reports from an LLM (resumable); `merge` builds "
                                     "the pre-training CSV")
    p.add_argument("action", nargs="?", choices=("run", "merge"), default="run")
    p.add_argument("--reports", help="CSV with study_id and report columns")
    p.add_argument("--out", help="output: context JSONL (run) or pre-training CSV (merge)")
    p.add_argument("--backend", choices=("openai", "transformers"), default="openai")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1 (vLLM, TGI, Ollama)")
    p.add_argument("--model", help="model name on the server, or a local/Hub causal LM for --backend transformers")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--allow-remote-llm", action="store_true",
                   help="send the reports to a --base-url off this machine and off private networks (MIMIC-CXR's and "
                        "FFA-IR's data-use terms forbid third-party services: only for a service they allow)")
    p.add_argument("--reports-not-credentialed", action="store_true",
                   help="the reports are under no credentialed data-use licence (not MIMIC-CXR or FFA-IR), so any "
                        "endpoint may receive them")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--batch-size", type=int, default=8, help="reports per generate() call (transformers backend)")
    p.add_argument("--device", default=None)
    p.add_argument("--modality", choices=("cxr", "fundus"), default="cxr")
    p.add_argument("--images", help="merge: CSV with study_id, img_path and report")
    p.add_argument("--context", help="merge: the JSONL written by `ecamp train distill`")
    p.add_argument("--no-progress", action="store_true")

    p = add("sr-windows", _cmd_sr_windows, "super-resolution windows: where a first-stage model finds the evidence "
                                           "for each report's findings")
    p.add_argument("--checkpoint", required=True, help="exported pre-training folder, run folder or checkpoint")
    p.add_argument("--data", required=True, help="data root with the reports CSV and images")
    p.add_argument("--out", required=True, help="windows CSV (img_path, label_i, label_j, source)")
    p.add_argument("--reports-csv", default="mimic-cxr-2.0.0-entity-llm.csv")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--method", choices=("occlusion", "gradient", "rollout", "max-heads"), default="occlusion",
                   help="occlusion: the window whose patches alone best explain the masked finding words; gradient: "
                        "gradient-weighted cross-attention; rollout: cross-attention through the encoder's rollout; "
                        "max-heads: cross-attention, max over heads (the literal reading of the authors' figure)")
    p.add_argument("--query", choices=("plain", "masked"), default="plain",
                   help="rollout, max-heads: the finding positions hold their words (plain) or [MASK] when "
                        "attention is read")
    p.add_argument("--save-maps", default=None, metavar="DIR",
                   help="write PNG pictures (film, map, chosen window) of the first --n-maps films (ecamp[plot])")
    p.add_argument("--n-maps", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")

    p = add("phantom", _cmd_phantom, "write a synthetic chest-film data set (pre-training or downstream layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--kind", choices=("pretrain", "classification", "segmentation", "detection"), default="pretrain",
                   help="pretrain: the authors' MIMIC-CXR layout; classification, segmentation, detection: their "
                        "downstream list files (effusion masks and boxes for the dense tasks)")
    p.add_argument("--report", choices=("full", "short"), default="full",
                   help="pretrain: full reports name every finding, present or negated; short ones only those present")
    p.add_argument("--one-of", default=None, metavar="F1,F2",
                   help="pretrain: every film also shows one of these findings (effusion, nodule, cardiomegaly, "
                        "pneumothorax), drawn uniformly")
    p.add_argument("--p-finding", type=float, default=None,
                   help="pretrain: probability of each finding (default 0.35)")
    p.add_argument("--no-progress", action="store_true")
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come anywhere, also after options: `--output-dir out optim.lr=1e-4`
    stray = [x for x in extra if x.startswith("-") or "=" not in x or args.command != "pretrain"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "pretrain":
        args.overrides = list(args.overrides) + extra
    try:
        return run_command(f"ecamp train {args.command}", args, verbose=True)
    finally:
        from ecamp.distributed import destroy_process_group

        destroy_process_group()
