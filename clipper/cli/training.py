"""`clipper train` and `train-captioner` (also under torchrun: `torchrun ... -m clipper train`)."""

from __future__ import annotations

import argparse
import json
from .common import add_config_flags, flag_values


def train_config_from_args(args: argparse.Namespace):
    """Preset, then --config file, then the flags, then --set FIELD=JSON overrides."""
    from ..run_config import merge_train_config

    overrides = flag_values(args, args.config_fields)
    if args.verb == "train-captioner":
        overrides["objective"] = "caption"
    return merge_train_config(args.preset, args.config, overrides, args.set or [])


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import Trainer

    cfg = train_config_from_args(args)
    summary = Trainer(cfg, args.out, resume=args.resume).fit()
    print(json.dumps(summary))


def _add_train_args(p: argparse.ArgumentParser, presets: str) -> None:
    from ..train_config import TrainConfig

    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, curves, final model)")
    p.add_argument("--preset", help=f"training preset: {presets} (default: none: TrainConfig's defaults)")
    p.add_argument("--config", help="TrainConfig JSON file (its fields override the preset's; default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any TrainConfig field, JSON value, nested with dots (e.g. augment.crop_scale=[0.5,1.0], "
                        "decoder.layers=3); applied last; repeatable (default: none)")
    p.set_defaults(fn=cmd_train, config_fields=add_config_flags(p, TrainConfig))


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="contrastive training (also under torchrun)",
                       description="Settings: --preset, then --config FILE, then the flags below, then --set.")
    _add_train_args(p, "fmnist-tiny, emoji-small")

    p = sub.add_parser("train-captioner", help="train a caption decoder on a model's image tower",
                       description="The caption objective of `clipper train` (same flags): --init names the "
                                   "trained model; the captioner presets freeze its image tower (--no-lock-image "
                                   "trains it too).")
    _add_train_args(p, "emoji-captioner, fmnist-captioner; emoji-vlm, fmnist-vlm (a llava decoder) and their "
                       "stage-2 emoji-vlm-2, fmnist-vlm-2")
