"""What the verbs share: the model flags and the spec they make, loading a model from them, flags
derived from config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from ..io import read_lines
from ..precision import PRECISIONS
from ..spec import ModelSpec


def add_model_args(p: argparse.ArgumentParser, required: bool = True, inference: bool = False,
                    precision: bool = True) -> None:
    p.add_argument("--model", required=required, help="model directory, ONNX export folder, open_clip checkpoint "
                   "file, or preset name" + ("" if required else " (default: the model the folder was embedded with)"))
    p.add_argument("--pretrained", help="with a preset: open_clip pretrained tag or weights file (default: none, random "
                   "weights, with a warning)")
    p.add_argument("--quick-gelu", action="store_true", default=None, help="force QuickGELU (OpenAI weights)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer folder (or hub name in the local HF cache) for a "
                                       "text tower that reads one (SigLIP, CLIPA, ...): default, the model's own")
    if precision:
        p.add_argument("--precision", choices=list(PRECISIONS), default=None,
                       help="fp32 (default), bf16 (CUDA, or CPUs with AVX512-BF16/AMX; refused elsewhere), int8 "
                            "(dynamic int8 linear layers, CPU, ~3x faster), auto (bf16 where native, else fp32)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: this process's GPU when there "
                                                         "is one (LOCAL_RANK under torchrun), else the CPU (default)")
        p.add_argument("--runtime", choices=["torch", "onnx"], default=None,
                       help="torch, or onnx (onnxruntime, on a folder from `clipper export --format onnx`); "
                            "default: what --model is")
    if inference:
        p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
        p.add_argument("--workers", type=int, default=1, help="processes decoding images (0: none; default: 1)")


def add_config_flags(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """A flag for each scalar field of the config dataclass `cls` (nested configs are set with
    --set), with the field's help text and default; unset flags parse as None (no override).
    Returns the field names."""
    names, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.default is dataclasses.MISSING:  # nested configs have factories
            continue
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        if type(None) in args:  # X | None: a flag of type X
            kind = next(a for a in args if a is not type(None))
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        text = f.metadata["help"]
        if "default" not in text:
            text += f" (default: {'none' if default is None else json.dumps(default)})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            p.add_argument(flag, dest=f.name, type=item, nargs="+", metavar=item.__name__.upper(), help=text)
        else:
            p.add_argument(flag, dest=f.name, type=kind, help=text)
        names.append(f.name)
    return names


def flag_values(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The model the flags name, its paths made absolute (saved beside embeddings, for search)."""
    return ModelSpec(args.model, args.pretrained, args.quick_gelu, getattr(args, "precision", None) or "fp32",
                     getattr(args, "runtime", None), getattr(args, "tokenizer", None)).resolved()


def load_model_from_args(args: argparse.Namespace):
    spec = model_spec(args)
    model = spec.load(getattr(args, "device", None))
    if spec.random_weights:
        print(f"clipper: {spec.model} without --pretrained has random weights: its results mean nothing "
              "(pass --pretrained TAG_OR_FILE, or a trained model)", file=sys.stderr)
    return model


def templates_from_args(args: argparse.Namespace) -> list[str] | None:
    from ..prompts import check_templates

    return check_templates(read_lines(args.templates, "templates"), args.templates) if args.templates else None


def add_datastore_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datastore", help="a decoder that retrieves captions (decoder.retrieve): retrieve from this "
                                       "folder (`clipper datastore`) instead of the model's own datastore "
                                       "(default: the model's)")


def with_datastore(model, args: argparse.Namespace) -> None:
    """`--datastore` in place of the model's own (a one-line error for a model that does not retrieve)."""
    if args.datastore:
        from ..retrieval import use_datastore

        use_datastore(model, args.datastore)
