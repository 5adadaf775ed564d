"""The ``ecamp`` command: parses arguments and calls the library; nothing else lives here.

``ecamp train ...`` and ``ecamp demo`` hand over to :mod:`ecamp.train` inside their functions: the one place where
the library reaches the training package, and only when those commands run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .console import run_command
from .version import __version__

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


_DEFAULT_RUNTIME = "auto"
_RUNTIME_HELP = ("auto (default): OpenVINO in bfloat16 on a CPU with native bf16 when the openvino extra is installed "
                 "and --dtype is not float32, else torch; torch: the model's own forward; onnxruntime or openvino "
                 "(CPU only: the model's ONNX graph, exported once into a cache and checked against torch; the onnx "
                 "or openvino extra). docs/deploying.md")
_DTYPE_HELP = ("the model's precision (default: float32, bfloat16 where --runtime auto runs OpenVINO); torch runs "
               "bfloat16 and float16 under autocast")



def _cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from .distributed import destroy_process_group, init_distributed, select_device
    from .embedding import embed_files, find_images, parse_shard
    from .factory import load

    shard = parse_shard(args.shard)
    files = find_images(args.paths)
    try:
        rank, world, local_rank = init_distributed()
        model = load(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
                     manifest=args.manifest)
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        result = embed_files(model, files, args.out, model_name=args.model, batch_size=args.batch_size,
                             num_workers=args.num_workers, device=select_device(args.device, local_rank),
                             dtype=dtype, progress=not args.no_progress and rank == 0, chunk_size=args.chunk_size,
                             resume=not args.no_resume, shard=shard, preprocess_on=args.preprocess_on,
                             features=args.features, max_output_gb=args.max_output_gb or None,
                             announce=lambda m: print(m, file=sys.stderr), runtime=args.runtime)
    finally:
        destroy_process_group()
    if not result.complete:
        if rank == 0:
            print(f"shard {shard[0]}/{shard[1]}: {result.chunks_done} chunk(s) done under {args.out}.partial; "
                  f"when every shard is done: ecamp embed merge --out {args.out}")
        return 0
    return _report_embedding(result)


def _cmd_embed_merge(args: argparse.Namespace) -> int:
    from .embedding import merge_embeddings

    result = merge_embeddings(args.out)
    return _report_embedding(result)


def _report_embedding(result) -> int:
    files = result.files
    n_bad = len(result.failures)
    print(f"embedded {len(files) - n_bad} of {len(files)} files -> {result.out}"
          + (f" ({result.runtime})" if result.runtime else "")
          + (f" (resumed {result.resumed_chunks} finished chunk(s))" if result.resumed_chunks else ""))
    if n_bad:
        print(f"{n_bad} file(s) could not be read (NaN rows):", file=sys.stderr)
        for _path, reason in list(result.failures.items())[:20]:
            print(f"  {reason}", file=sys.stderr)
        if n_bad > 20:
            print(f"  ... and {n_bad - 20} more (see the output's failure list)", file=sys.stderr)
    return 1 if n_bad == len(files) else 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from .distributed import select_device
    from .embedding import find_images
    from .factory import load
    from .predict import predict_files

    files = find_images(args.paths)
    model = load(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only, manifest=args.manifest)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    result = predict_files(model, files, args.out, model_name=args.model, batch_size=args.batch_size,
                           num_workers=args.num_workers, device=select_device(args.device), dtype=dtype,
                           progress=not args.no_progress, calibrated=not args.no_calibration,
                           runtime=args.runtime)
    n_bad = len(result.failures)
    print(f"{result.task}: predicted {len(files) - n_bad} of {len(files)} files -> {result.out} ({result.runtime})")
    if n_bad:
        print(f"{n_bad} file(s) could not be read (skipped; listed in {result.out}):", file=sys.stderr)
        for reason in list(result.failures.values())[:20]:
            print(f"  {reason}", file=sys.stderr)
        if n_bad > 20:
            print(f"  ... and {n_bad - 20} more", file=sys.stderr)
    return 1 if n_bad == len(files) else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert, convert_from_authors
    from .errors import InvalidArgumentError

    if args.from_authors is not None:
        if args.name is not None:
            raise InvalidArgumentError(f"--from-authors {args.from_authors} already names what the download "
                                       f"becomes; drop --name {args.name}.")
        name = args.from_authors
        result = convert_from_authors(name, out=args.out, config=args.config, tokenizer=args.tokenizer,
                                      manifest=args.manifest, force=args.force)
    else:
        if args.name is None:
            raise InvalidArgumentError(f"Say what {args.checkpoint} becomes with --name (cxr-vit-b, fundus-vit-b, "
                                       f"cxr-ecamp-b-pretrain...).")
        if args.force:
            raise InvalidArgumentError("--force replaces weights converted from another download; it belongs to "
                                       "--from-authors.")
        name = args.name
        result = convert(args.checkpoint, name, out=args.out, config=args.config, tokenizer=args.tokenizer,
                         manifest=args.manifest)
    print(json.dumps(result, indent=2))
    if args.from_authors is not None:
        print(f"downloaded {result['original_url']}: sha256 {result['original_sha256']} (recorded in "
              f"{result['out']}/config.json)", file=sys.stderr)
    if not args.out:
        print(f"ecamp.load({name!r}) now finds these weights offline.", file=sys.stderr)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .publish import push

    result = push(args.folder, args.repo, name=args.name, private=args.private, token=args.token,
                  commit_message=args.message, manifest=args.manifest_out, gated=args.gated)
    print(json.dumps(result, indent=2))
    if args.manifest_out:
        print(f"ecamp.load({result['name']!r}, manifest={args.manifest_out!r}) loads commit {result['revision']} "
              f"(or set ECAMP_MANIFEST={args.manifest_out}).", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.model, args.out, format=args.format, opset=args.opset, atol=args.atol,
                    manifest=args.manifest)
    parity = result["parity"]
    opset = f", opset {result['opset']}" if result["opset"] is not None else ""
    print(f"{result['kind']} -> {result['out']}/{result['file']} ({result['format']}{opset}, dynamic batch); "
          f"max abs difference from torch {parity['max_abs_diff']:.3g} at batch sizes "
          f"{', '.join(map(str, parity['batch_sizes']))} (atol {parity['atol']:g})")
    return 0


def _train_main():
    try:
        from .train.cli import main
    except ImportError as e:
        from .errors import MissingDependencyError

        raise MissingDependencyError(f"Training needs the train extra ({e.name} is missing): "
                                     f"pip install \"ecamp[train]\"") from e
    return main


def _cmd_train(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    return _train_main()(rest[1:] if rest[:1] == ["--"] else rest)


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    _train_main()  # a clear error without the train extra
    from .train.demo import run_demo

    out = args.out or tempfile.mkdtemp(prefix="ecamp-demo-")
    result = run_demo(out, n_pretrain=args.n_pretrain, n_probe=args.n_probe, max_steps=args.max_steps,
                      ablation=args.ablation, progress=not args.no_progress)
    if result["mean_pretrained"] <= result["mean_random"]:
        print("The pre-trained encoder did not beat random initialisation.", file=sys.stderr)
        return 1
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .errors import InvalidArgumentError
    from .explain import save_overlay
    from .factory import load

    if args.text is not None or args.findings is not None:
        return _cmd_ground(args)
    for flag, value in (("--token", args.token), ("--word", args.word), ("--authors-canvas", args.authors_canvas)):
        if value not in (None, False):
            raise InvalidArgumentError(f"{flag} chooses what a sentence grounds: pass --text with a pre-training "
                                       f"model.")
    if args.method not in (None, "rollout", "gradcam"):
        raise InvalidArgumentError(f"--method {args.method} grounds a sentence: pass --text with a pre-training model.")
    if len(args.file) != 1 or args.out is None:
        raise InvalidArgumentError("ecamp explain draws one image: give one FILE and --out map.png.")
    model = load(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
                 manifest=args.manifest)
    done = save_overlay(model, args.file[0], args.out, target=args.target, method=args.method,
                        model_name=args.model)
    print(f"{done['method']}" + (f" of {done['target']}" if done["target"] else "") + f" -> {done['out']}")
    return 0


def _cmd_ground(args: argparse.Namespace) -> int:
    """``ecamp explain --text``/``--findings``: the full pre-training model on a sentence or finding phrases."""
    from .errors import InvalidArgumentError
    from .factory import load_pretrain
    from .grounding import METHODS, save_grounding, score_findings

    if args.text is not None and args.findings is not None:
        raise InvalidArgumentError("Pass --text (a map of one sentence) or --findings (scores), not both.")
    if args.target is not None:
        raise InvalidArgumentError("--target is a classifier's class; a sentence is chosen with --text.")
    if args.text is not None:
        method = args.method or "occlusion"
        if method not in METHODS:
            raise InvalidArgumentError(f"--method {method} is not a grounding method; with --text use one of "
                                       f"{METHODS}.")
        if len(args.file) != 1 or args.out is None:
            raise InvalidArgumentError("ecamp explain --text draws one image: give one FILE and --out map.png.")
        model = load_pretrain(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
                              manifest=args.manifest)
        done = save_grounding(model, args.file[0], args.text, args.out, method=method, token=args.token,
                              word=args.word, authors_canvas=args.authors_canvas, model_name=args.model)
        print(f"{done['method']} of {' '.join(done['words'])!r} -> {done['out']}")
        return 0
    findings = [f.strip() for f in args.findings.split(",") if f.strip()]
    if args.method or args.token is not None or args.word or args.authors_canvas:
        raise InvalidArgumentError("--findings scores whole films; --method, --token, --word and --authors-canvas "
                                   "belong to --text.")
    if args.out is not None and not args.out.endswith(".csv"):
        raise InvalidArgumentError(f"--out {args.out}: --findings writes a CSV (name it .csv), or omit --out to "
                                   f"print the scores.")
    model = load_pretrain(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
                          manifest=args.manifest)
    scores = score_findings(model, args.file, findings)
    rows = [[f, *[f"{v:.4f}" for v in row]] for f, row in zip(args.file, scores, strict=True)]
    if args.out is not None:
        from .fileio import write_csv

        write_csv(args.out, ["file", *findings], rows)
        print(f"{len(rows)} films x {len(findings)} findings -> {args.out}")
    else:
        print("\t".join(["file", *findings]))
        for row in rows:
            print("\t".join(row))
    return 0


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (a bad value is a usage error, not a traceback later)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r:.40} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecamp", description="ECAMP pretrained medical image encoders.")
    parser.add_argument("--version", action="version", version=f"ecamp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and downloaded")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, manifest: bool = True,
            **kw: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(func=fn)
        if manifest:
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
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("checkpoint", nargs="?", default=None,
                     help="e.g. ECAMP_ViT_Base_16.pth (read with weights_only=True, never unpickled)")
    src.add_argument("--from-authors", metavar="NAME", default=None,
                     help="download the authors' release of NAME from the manifest's link (Google Drive; needs "
                          "pip install \"ecamp[authors]\") and convert it")
    p.add_argument("--name", default=None, help="what CHECKPOINT becomes: cxr-vit-b, fundus-vit-b, "
                                                "cxr-ecamp-b-pretrain...")
    p.add_argument("--force", action="store_true", help="with --from-authors: replace weights that were converted "
                                                        "from other bytes (a changed release)")
    p.add_argument("--out", default=None, help="folder to write (default: ecamp's local store, which "
                                               "ecamp.load(NAME) reads)")
    p.add_argument("--config", default=None, help="JSON of ECAMPPretrainConfig fields, for non-default sizes")
    p.add_argument("--tokenizer", default=None, help="tokenizers JSON (e.g. the authors' mimic_wordpiece.json) to "
                                                     "store with a full pre-training model")

    p = add("push", _cmd_push, "upload an ecamp folder to a Hub repo and write its pinned, hashed manifest entry",
            manifest=False)
    p.add_argument("folder", help="a folder written by ecamp.save_pretrained, `ecamp train export` or `ecamp convert`")
    p.add_argument("--repo", required=True, help="Hub repo org/name (created if missing)")
    p.add_argument("--name", default=None, help="the entry's manifest name (default: the folder's own, else the "
                                                "repo's name)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--gated", choices=("auto", "manual"), default=None,
                   help="users must request access (manual: you approve each request; auto: approved at once); "
                        "needed, or --private, for a folder with a text side trained on credentialed reports")
    p.add_argument("--manifest-out", default=None, help="manifest file to add the entry to (created if missing)")
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth "
                                                 "login`)")
    p.add_argument("--message", default=None, help="commit message")

    p = add("export", _cmd_export, "export an encoder, classifier, segmentation or detection model to ONNX (the "
                                   "[onnx] extra) or TorchScript, checked against torch")
    p.add_argument("model", help="model name, hf-hub:org/repo, local-dir:/path or a folder")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="folder to write: the graph, config.json and export.json (replaced "
                                                "if it exists)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (recorded in export.json)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest max abs difference from torch accepted")

    p = add("embed", _cmd_embed, "embed image files and folders into .npy, .safetensors, .parquet or .csv")
    p.add_argument("paths", nargs="+", help="image files (DICOM, PNG, JPEG, TIFF) and folders (searched recursively)")
    p.add_argument("--model", required=True, help="model name, hf-hub:org/repo or local-dir:/path")
    p.add_argument("--out", required=True, help="output file: .npy (plus .files.txt), .safetensors, .parquet (the "
                                                "parquet extra) or .csv; tables have a path column and f0, f1...")
    p.add_argument("--features", choices=("pooled", "cls", "tokens"), default="pooled",
                   help="pooled: the model's output [N, D]; cls: the class token [N, C]; tokens: every token [N, T, C] "
                        "(.safetensors or .npy only)")
    p.add_argument("--max-output-gb", type=float, default=10.0,
                   help="refuse an output larger than this (stated before starting; 0: no limit)")
    p.add_argument("--batch-size", type=_at_least(1), default=32)
    p.add_argument("--num-workers", type=_at_least(0), default=0, help="DataLoader worker processes for decoding")
    p.add_argument("--device", default="auto", help="auto (this process's GPU, else Apple's MPS, else the CPU), cpu, "
                                                    "cuda, cuda:1, mps")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="embed part I of N (0-based; job arrays without torchrun), then `ecamp embed merge`")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help=_DTYPE_HELP)
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime", "openvino"), default=_DEFAULT_RUNTIME,
                   help=_RUNTIME_HELP)
    p.add_argument("--preprocess-on", choices=("cpu", "gpu", "auto"), default="auto",
                   help="where intensity policy, resize and normalisation run: cpu (in the workers), gpu (workers only "
                        "decode; the rest runs on --device in batches), auto (gpu when --device is CUDA)")
    p.add_argument("--chunk-size", type=_at_least(1), default=1024,
                   help="images per saved chunk (the resume granularity)")
    p.add_argument("--no-resume", action="store_true", help="start over even if an interrupted run left chunks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--local-files-only", action="store_true", help="do not touch the network")

    # `ecamp embed merge --out FILE` (main() routes it here): join what `--shard I/N` runs left
    p = add("embed-merge", _cmd_embed_merge, "join the chunks of `ecamp embed --shard I/N` runs into one output",
            manifest=False)
    p.add_argument("--out", required=True, help="the --out the shards were given")

    p = add("predict", _cmd_predict, "run a fine-tuned model (e.g. the best/ folder of `ecamp train finetune`) on "
                                     "image files and folders")
    p.add_argument("paths", nargs="+", help="image files (DICOM, PNG, JPEG, TIFF) and folders (searched recursively)")
    p.add_argument("--model", required=True, help="local-dir:/path (a fine-tuned model's folder), hf-hub:org/repo...")
    p.add_argument("--out", required=True, help="classification: a .csv or .parquet (path, one probability per "
                                                "label, a 0/1 decision per label at the model's operating points "
                                                "where it has them, error); "
                                                "segmentation: a folder of mask PNGs with predictions.csv; "
                                                "detection: a .json (boxes in the original images' pixels)")
    p.add_argument("--batch-size", type=_at_least(1), default=32)
    p.add_argument("--num-workers", type=_at_least(0), default=0, help="DataLoader worker processes for decoding")
    p.add_argument("--device", default="auto", help="auto (the GPU, else Apple's MPS, else the CPU), cpu, cuda, "
                                                    "cuda:1, mps")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help=_DTYPE_HELP)
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime", "openvino"), default=_DEFAULT_RUNTIME,
                   help=_RUNTIME_HELP)
    p.add_argument("--no-calibration", action="store_true",
                   help="classification: the model's raw probabilities, not those calibrated on its validation split "
                        "(decisions then use the thresholds fitted on the raw probabilities)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--local-files-only", action="store_true", help="do not touch the network")

    # add_help=False: `ecamp train --help` is the training CLI's own help
    p = add("train", _cmd_train, "training (the [train] extra): pretrain, finetune, export, distill, sr-windows, "
                                 "phantom, presets; `ecamp train --help` for details", manifest=False, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="a training command and its arguments")

    p = add("demo", _cmd_demo, "offline CPU demo: phantom data, pre-training, export, load, linear probes")
    p.add_argument("--out", default=None, help="working folder (default: a new temporary folder)")
    p.add_argument("--n-pretrain", type=int, default=2000)
    p.add_argument("--n-probe", type=int, default=600)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--ablation", action="store_true",
                   help="also pre-train without the reports (MIM + super-resolution only) and add its column")
    p.add_argument("--no-progress", action="store_true")

    p = add("explain", _cmd_explain, "where a model looks on one image: a heat map over the film, as PNG "
                                     "(the [plot] extra)")
    p.add_argument("file", nargs="+", help="the image (DICOM, PNG, JPEG, TIFF); several with --findings")
    p.add_argument("--model", required=True, help="model name, hf-hub:org/repo or local-dir:/path (with --text or "
                                                  "--findings: a pre-training model)")
    p.add_argument("--out", default=None, help="the PNG to write (--findings: a CSV, default: print)")
    p.add_argument("--method", choices=("rollout", "gradcam", "occlusion", "authors", "gradient"), default=None,
                   help="default: gradcam for a classifier, attention rollout for an encoder; with --text: "
                        "occlusion (default), authors or gradient")
    p.add_argument("--target", default=None, help="Grad-CAM's class, a label name or an index (default: the top "
                                                   "class)")
    p.add_argument("--text", default=None, help="ground this sentence on the film with the full pre-training model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--token", type=_at_least(0), default=None,
                       help="score this token position of '[CLS] ' + text (authors default: 4)")
    which.add_argument("--word", default=None, help="score this word of the text")
    p.add_argument("--authors-canvas", action="store_true",
                   help="--method authors: write their 224-pixel blend instead of the film-sized figure")
    p.add_argument("--findings", default=None, metavar="A,B,...",
                   help="experimental: score each FILE for these comma-separated finding phrases (log-likelihood "
                        "of the phrase against its negation)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--local-files-only", action="store_true", help="do not touch the network")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"]:  # the training CLI parses its own arguments, --help included
        argv = ["train", "--", *argv[1:]]
    elif argv[:2] == ["embed", "merge"]:
        argv = ["embed-merge", *argv[2:]]
    args = parser.parse_args(argv)
    prog = "ecamp embed merge" if args.command == "embed-merge" else f"ecamp {args.command}"
    return run_command(prog, args, verbose=args.verbose)
