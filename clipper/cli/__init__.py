"""The `clipper` command. Thin: parse arguments, call the library, print; one clear line on bad
input. Its verbs, a module per group: `models` (presets, info, convert, export), `data`, `training`
(train, train-captioner), `inference` (caption, eval, embed, classify, similarity), `chat`, `search`
(serve, index, search); `common` holds the model flags they share."""

from __future__ import annotations

import argparse
import os
import sys

from ..data.remote import PIPE_ENV
from ..errors import ClipperError
from ..version import __version__
from . import chat, data, inference, models, search, training


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipper", description="CLIP-style image-text models, fast on CPUs.")
    ap.add_argument("--version", action="version", version=f"clipper {__version__}")
    ap.add_argument("--allow-pipe", action="store_true",
                    help="data specs typed here may be pipe:COMMAND shards, run in a shell (names found in folders, "
                         "globs, list and id files never are; sets CLIPPER_ALLOW_PIPE=1 for this run)")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    models.add_parsers(sub)
    data.add_parsers(sub)
    training.add_parsers(sub)
    labels = argparse.ArgumentParser(add_help=False)
    labels.add_argument("--labels", help="class names, comma-separated (eval default: the set's classnames.txt)")
    labels.add_argument("--labels-file", help="class names, one per line (default: none)")
    labels.add_argument("--templates", help="prompt templates with {} for the name, one per line "
                                            "(default: 'a photo of a {}.'; eval: the set's templates.txt when it has "
                                            "one); several are averaged")

    inference.add_parsers(sub, labels)
    chat.add_parsers(sub)
    search.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run a verb. Bad input (a ClipperError) is one line on stderr and exit status 2; anything
    else is a bug and raises with its traceback."""
    args = build_parser().parse_args(argv)
    if args.allow_pipe:
        os.environ[PIPE_ENV] = "1"
    try:
        args.fn(args)
    except ClipperError as e:
        print(f"clipper {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clipper presets | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    return 0
