"""The ``ecamp`` command. It parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import EcampError

__all__ = ["main", "build_parser"]


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import load_manifest

    man = load_manifest(args.manifest)
    entries = sorted(man.models.values(), key=lambda e: (e.kind, e.name))
    if args.json:
        print(json.dumps([{"name": e.name, "aliases": list(e.aliases), "kind": e.kind,
                           "modality": e.ecamp.get("modality"), "published": e.published, "hf_repo": e.hf_repo,
                           "revision": e.revision} for e in entries], indent=2))
        return 0
    rows = [("ALIAS", "NAME", "KIND", "MODALITY", "STATUS")]
    for e in entries:
        status = f"published @ {e.revision[:10]}" if e.published and e.revision else "not published yet"
        rows.append((", ".join(e.aliases) or "-", e.name, e.kind, str(e.ecamp.get("modality")), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"\nmanifest: {man.source}\nAlso: 'hf-hub:org/repo[@revision]' and 'local-dir:/path'.")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .factory import download

    paths = download(args.name, revision=args.revision, cache_dir=args.cache_dir, force_download=args.force,
                     manifest=args.manifest)
    for fname, path in paths.items():
        print(f"{fname}\t{path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .integrity import verify

    results = verify(args.name, cache_dir=args.cache_dir, manifest=args.manifest)
    for r in results:
        line = f"{r.status:<12} {r.name}  {r.file}"
        if r.path:
            line += f"  {r.path}"
        if r.detail:
            line += f"  ({r.detail})"
        print(line)
    failed = [r for r in results if r.failed]
    if failed:
        print(f"{len(failed)} file(s) failed verification; re-fetch with `ecamp download NAME --force`.",
              file=sys.stderr)
        return 1
    if args.name is not None and any(r.status == "not-cached" for r in results):
        print(f"{args.name} is not (fully) cached; fetch it with `ecamp download {args.name}`.", file=sys.stderr)
        return 1
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from .embedding import embed_files, find_images
    from .factory import load

    files = find_images(args.paths)
    model = load(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
                 manifest=args.manifest)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    result = embed_files(model, files, args.out, model_name=args.model, batch_size=args.batch_size,
                         num_workers=args.num_workers, device=args.device, dtype=dtype,
                         progress=not args.no_progress, chunk_size=args.chunk_size, resume=not args.no_resume)
    n_bad = len(result.failures)
    print(f"embedded {len(files) - n_bad} of {len(files)} files -> {result.out}"
          + (f" (resumed {result.resumed_chunks} finished chunk(s))" if result.resumed_chunks else ""))
    if n_bad:
        print(f"{n_bad} file(s) could not be read (NaN rows):", file=sys.stderr)
        for _path, reason in list(result.failures.items())[:20]:
            print(f"  {reason}", file=sys.stderr)
        if n_bad > 20:
            print(f"  ... and {n_bad - 20} more (see the output's failure list)", file=sys.stderr)
    return 1 if n_bad == len(files) else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .hub import local_store_path, save_pretrained
    from .models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
    from .registry import load_manifest

    entry = load_manifest(args.manifest).resolve(args.name)
    config = None
    if args.config:
        config = ECAMPPretrainConfig.from_dict(json.loads(open(args.config, encoding="utf-8").read()))
    model = ECAMPPretrainModel.from_upstream(args.checkpoint, config=config)
    out = args.out or local_store_path(entry.name)
    if entry.kind == "pretrain":
        block = dict(entry.ecamp, name=entry.name, provenance={"converted_from": str(args.checkpoint)})
        result = model.save_pretrained(out, tokenizer=args.tokenizer, ecamp_cfg=block)
        print(json.dumps({"out": str(out), "files": result["files"]}, indent=2))
        return 0
    if args.tokenizer:
        raise EcampError("--tokenizer belongs to full pre-training models; an image encoder has no tokenizer.")
    encoder = model.to_encoder(entry.ecamp.get("modality", "cxr"))
    encoder.ecamp_cfg["provenance"] = {"converted_from": str(args.checkpoint),
                                       "original_file": entry.provenance.get("original_file")}
    manifest_entry = save_pretrained(encoder, out, name=entry.name, hf_repo=entry.hf_repo)
    print(json.dumps({"out": str(out), "files": manifest_entry["files"]}, indent=2))
    if not args.out:
        print(f"ecamp.load({args.name!r}) now finds these weights offline.", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import main as train_main  # the CLI is the one library file allowed to reach ecamp.train

    return train_main(args.rest)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .train.phantom import write_phantom

    if args.kind == "classification":
        from .train.phantom import write_phantom_classification

        root = write_phantom_classification(args.out, args.n, seed=args.seed, size=args.size,
                                            progress=not args.no_progress)
    elif args.kind == "pretrain":
        root = write_phantom(args.out, args.n, seed=args.seed, size=args.size, progress=not args.no_progress)
    elif args.kind == "segmentation":
        from .train.phantom import write_phantom_segmentation

        root = write_phantom_segmentation(args.out, args.n, seed=args.seed, size=args.size,
                                          progress=not args.no_progress)
    else:
        from .train.phantom import write_phantom_detection

        root = write_phantom_detection(args.out, args.n, seed=args.seed, size=args.size,
                                       progress=not args.no_progress)
    print(f"wrote {args.n} phantom cases to {root}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .train.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, args.name, hf_repo=args.hf_repo, tokenizer=args.tokenizer,
                               manifest=args.manifest)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from .train.demo import run_demo

    out = args.out or tempfile.mkdtemp(prefix="ecamp-demo-")
    result = run_demo(out, n_pretrain=args.n_pretrain, n_probe=args.n_probe, max_steps=args.max_steps,
                      progress=not args.no_progress)
    if result["mean_pretrained"] <= result["mean_random"]:
        print("The pre-trained encoder did not beat random initialisation.", file=sys.stderr)
        return 1
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .train.distill import OpenAIBackend, TransformersBackend, distill, merge_context

    if args.action == "merge":
        if not (args.images and args.context and args.out):
            raise EcampError("`ecamp distill merge` needs --images, --context and --out.")
        counts = merge_context(args.images, args.context, args.out)
        print(f"wrote {counts['rows']} rows ({counts['with_context']} with context) to {args.out}")
        return 0
    if not (args.reports and args.out and args.model):
        raise EcampError("`ecamp distill` needs --reports, --out and --model.")
    if args.backend == "openai":
        if not args.base_url:
            raise EcampError("--backend openai needs --base-url, e.g. http://localhost:8000/v1")
        backend = OpenAIBackend(args.base_url, args.model, api_key_env=args.api_key_env, timeout=args.timeout)
    else:
        backend = TransformersBackend(args.model, batch_size=args.batch_size, device=args.device)
    summary = distill(args.reports, args.out, backend, modality=args.modality, concurrency=args.concurrency,
                      max_retries=args.max_retries, progress=not args.no_progress)
    for line in summary.lines():
        print(line)
    return 1 if summary.failed else 0


def _cmd_sr_windows(args: argparse.Namespace) -> int:
    from .train.sr_windows import compute_windows

    counts = compute_windows(args.checkpoint, args.data, args.out, reports_csv=args.reports_csv,
                             batch_size=args.batch_size, device=args.device, query=args.query,
                             progress=not args.no_progress)
    print(f"{counts['attention']} windows from attention, {counts['no_entity']} reports without an entity "
          f"(left to data.default_window), written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecamp", description="ECAMP pretrained medical image encoders.")
    parser.add_argument("--version", action="version", version=f"ecamp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and downloaded")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        p.add_argument("--manifest", default=None, help="another weights manifest (default: $ECAMP_MANIFEST or "
                                                        "the packaged one)")
        return p

    p = add("list", _cmd_list, "list the models of the manifest")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("download", _cmd_download, "fetch a model into the Hugging Face cache and verify it")
    p.add_argument("name", help="manifest name or alias, or hf-hub:org/repo[@revision]")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: the manifest's pinned one)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--force", action="store_true", help="download again even if cached (repairs corrupt files)")

    p = add("verify", _cmd_verify, "re-hash cached weights against the manifest (offline)")
    p.add_argument("name", nargs="?", default=None, help="one model (default: every published model)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE)")

    p = add("convert", _cmd_convert, "convert the authors' pre-training checkpoint (.pth) into an ecamp encoder "
                                     "(or, for a *-pretrain name, the full pre-training model)")
    p.add_argument("checkpoint", help="e.g. ECAMP_ViT_Base_16.pth (read with weights_only=True, never unpickled)")
    p.add_argument("--name", required=True, help="what it becomes: cxr-vit-b, fundus-vit-b, cxr-ecamp-b-pretrain...")
    p.add_argument("--out", default=None, help="folder to write (default: ecamp's local store, which "
                                               "ecamp.load(NAME) reads)")
    p.add_argument("--config", default=None, help="JSON of ECAMPPretrainConfig fields, for non-default sizes")
    p.add_argument("--tokenizer", default=None, help="tokenizers JSON (e.g. the authors' mimic_wordpiece.json) to "
                                                     "store with a full pre-training model")

    p = add("embed", _cmd_embed, "embed image files and folders into .npy or .safetensors")
    p.add_argument("paths", nargs="+", help="image files (DICOM, PNG, JPEG, TIFF) and folders (searched recursively)")
    p.add_argument("--model", required=True, help="model name, hf-hub:org/repo or local-dir:/path")
    p.add_argument("--out", required=True, help="output file, .npy (plus .files.txt) or .safetensors")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autocast dtype for the model")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per saved chunk (the resume granularity)")
    p.add_argument("--no-resume", action="store_true", help="start over even if an interrupted run left chunks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--local-files-only", action="store_true", help="do not touch the network")

    p = add("train", _cmd_train, "training: `ecamp train pretrain --config ... --data-root ... --output-dir ...`")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of `python -m ecamp.train`")

    p = add("phantom", _cmd_phantom, "write a synthetic chest-film data set in the authors' pre-training layout")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--kind", choices=("pretrain", "classification", "segmentation", "detection"), default="pretrain",
                   help="pretrain: the authors' MIMIC-CXR layout; classification, segmentation, detection: their "
                        "downstream list files (effusion masks and boxes for the dense tasks)")
    p.add_argument("--no-progress", action="store_true")

    p = add("export", _cmd_export, "export a training checkpoint: encoder (timm format) and full pre-training model")
    p.add_argument("checkpoint", help="checkpoint-*.pt, or a run's output folder (its latest checkpoint)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True, help="the encoder's manifest name, e.g. cxr-vit-b")
    p.add_argument("--hf-repo", default=None, help="the Hub repo it will be published as (default: the manifest's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")

    p = add("distill", _cmd_distill, "entity-centred context for reports from an LLM (resumable); `merge` builds the "
                                     "pre-training CSV")
    p.add_argument("action", nargs="?", choices=("run", "merge"), default="run")
    p.add_argument("--reports", help="CSV with study_id and report columns")
    p.add_argument("--out", help="output: context JSONL (run) or pre-training CSV (merge)")
    p.add_argument("--backend", choices=("openai", "transformers"), default="openai")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1 (vLLM, TGI, Ollama)")
    p.add_argument("--model", help="model name on the server, or a local/Hub causal LM for --backend transformers")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--batch-size", type=int, default=8, help="reports per generate() call (transformers backend)")
    p.add_argument("--device", default=None)
    p.add_argument("--modality", choices=("cxr", "fundus"), default="cxr")
    p.add_argument("--images", help="merge: CSV with study_id, img_path and report")
    p.add_argument("--context", help="merge: the JSONL written by `ecamp distill`")
    p.add_argument("--no-progress", action="store_true")

    p = add("sr-windows", _cmd_sr_windows, "super-resolution windows from a first-stage model's entity attention")
    p.add_argument("--checkpoint", required=True, help="exported pre-training folder, run folder or checkpoint")
    p.add_argument("--data", required=True, help="data root with the reports CSV and images")
    p.add_argument("--out", required=True, help="windows CSV (img_path, label_i, label_j, source)")
    p.add_argument("--reports-csv", default="mimic-cxr-2.0.0-entity-llm.csv")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--query", choices=("plain", "masked"), default="plain",
                   help="entity positions hold the entity words (plain) or [MASK] (masked) when attention is read")
    p.add_argument("--no-progress", action="store_true")

    p = add("demo", _cmd_demo, "offline CPU demo: phantom data, pre-training, export, load, linear probes")
    p.add_argument("--out", default=None, help="working folder (default: a new temporary folder)")
    p.add_argument("--n-pretrain", type=int, default=2000)
    p.add_argument("--n-probe", type=int, default=600)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("ecamp").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except EcampError as e:
        print(f"ecamp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
