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
    from .verify import verify

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
