"""`clipper chat`: questions about an image to a vision-language model (LLaVA, Idefics3, SmolVLM folders)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from ..generate import GenerationConfig
from .common import add_config_flags, add_datastore_arg, flag_values, load_model_from_args, with_datastore


def cmd_chat(args: argparse.Namespace) -> None:
    from ..vlm import as_vlm

    model = load_model_from_args(args)
    with_datastore(model, args)
    model = as_vlm(model)
    if model is None:
        raise ConfigError(f"--model {args.model}: not a vision-language model (a LLaVA, Idefics3 or SmolVLM "
                          "folder, or a model with a llava decoder); captioners answer `clipper caption`")
    options = flag_values(args, args.config_fields)
    if args.sample is not None:  # else the folder's generation_config decides
        options["do_sample"] = args.sample
    if args.stop:
        options["stop_strings"] = args.stop
    talk = model.conversation(args.image)
    if args.prompt is not None:
        _answer(talk, args.prompt, args.json, options)
        return
    if not sys.stdin.isatty():
        raise ConfigError("give a prompt (an interactive chat needs a terminal)")
    print("a chat about the image; an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        _answer(talk, prompt, args.json, options)


def _answer(talk, prompt: str, as_json: bool, options: dict) -> None:
    if as_json:
        print(json.dumps(talk.ask(prompt, **options), ensure_ascii=False), flush=True)
        return
    talk.ask(prompt, stream=lambda piece: print(piece, end="", flush=True), **options)
    print(flush=True)


def add_parsers(sub) -> None:
    from .common import add_model_args

    p = sub.add_parser("chat", help="ask a vision-language model about an image (interactive without a prompt)")
    p.add_argument("image", help="an image file")
    p.add_argument("prompt", nargs="?", help="the question (none, on a terminal: an interactive chat)")
    add_model_args(p)
    add_datastore_arg(p)
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample (temperature, top-k, top-p) instead of greedy/beam; --no-sample: greedy "
                        "(default: as the folder's generation_config.json says)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the answer before TEXT (repeatable; "
                   "default: none)")
    p.add_argument("--json", action="store_true", help='print {"text", "tokens", "seconds"} per answer')
    p.set_defaults(fn=cmd_chat, config_fields=add_config_flags(p, GenerationConfig, skip=("do_sample",)))
