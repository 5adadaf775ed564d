"""MkDocs hook: the command-line reference, rendered from the real argparse parsers.

A page that holds the line ``<!-- ecamp:cli -->`` gets, in its place, one section per command and subcommand with
its ``--help`` text: ``ecamp`` from :func:`ecamp.cli.build_parser`, ``ecamp train`` from
:func:`ecamp.train.cli.build_parser`, walking every subparser recursively. The parsers are imported when the page
is built (neither imports torch), so the reference can never disagree with ``--help``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

PLACEHOLDER = "<!-- ecamp:cli -->"
WIDTH = 110  # the help text's line width (argparse reads $COLUMNS)


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    yield name, sub


def _help(parser: argparse.ArgumentParser, prog: str) -> str:
    parser.prog = prog
    for action in parser._actions:  # usage lines of nested subparsers carry the old prog
        if isinstance(action, argparse._SubParsersAction):
            action._prog_prefix = prog
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def walk(parser: argparse.ArgumentParser, prog: str, level: int = 2) -> Iterator[tuple[int, str, str]]:
    """``(heading level, command, help text)`` for ``parser`` and every subcommand below it, in definition order.

    Two spellings of the ``ecamp`` parser are resolved here: ``ecamp train`` hands its arguments to the training
    parser (which is walked in its place), and the ``embed-merge`` subparser is typed ``ecamp embed merge``.
    """
    subs = list(_subcommands(parser))
    yield level, prog, _help(parser, prog)
    for name, sub in subs:
        if prog == "ecamp" and name == "train":
            from ecamp.train.cli import build_parser as build_train_parser

            yield from walk(build_train_parser(), "ecamp train", level + 1)
            continue
        if prog == "ecamp" and name == "embed-merge":
            name = "embed merge"
        yield from walk(sub, f"{prog} {name}", level + 1)


def render() -> str:
    from ecamp.cli import build_parser

    out = []
    for level, prog, text in walk(build_parser(), "ecamp"):
        out.append(f"{'#' * level} `{prog}`\n\n```text\n{text}\n```\n")
    return "\n".join(out)


def commands() -> list[str]:
    """Every command the reference documents, e.g. ``["ecamp", "ecamp list", ..., "ecamp train finetune"]``."""
    from ecamp.cli import build_parser

    return [prog for _, prog, _ in walk(build_parser(), "ecamp")]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, render())
    return markdown
