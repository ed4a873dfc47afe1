"""The `clipper` command. Thin: parse arguments, call the library, print; one clear line on bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.debian import PackageError

# Errors that mean "bad input": reported as one line and exit status 2, never a traceback.
USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, NotADirectoryError, PackageError, ValueError)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory, open_clip checkpoint file, or preset name")
    p.add_argument("--pretrained", help="with a preset: open_clip pretrained tag or weights file")
    p.add_argument("--quick-gelu", action="store_true", default=None, help="force QuickGELU (OpenAI weights)")


def _load(args: argparse.Namespace):
    from .factory import load

    return load(args.model, pretrained=args.pretrained, quick_gelu=args.quick_gelu)


def cmd_presets(args: argparse.Namespace) -> None:
    from .config import list_presets

    print("\n".join(list_presets()))


def cmd_info(args: argparse.Namespace) -> None:
    model = _load(args)
    n_vis = sum(p.numel() for p in model.visual.parameters())
    n_txt = sum(p.numel() for p in model.text.parameters())
    print(json.dumps({"config": model.config.to_dict(), "parameters": {
        "visual": n_vis, "text": n_txt, "total": sum(p.numel() for p in model.parameters())}}, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    """open_clip file -> clipper directory, or clipper model -> open_clip file."""
    from .checkpoint import save_model
    from .interop import save_open_clip_checkpoint

    model = _load(args)
    out = Path(args.out)
    if out.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        save_open_clip_checkpoint(model, out)
        print(f"wrote open_clip state dict {out}")
    else:
        save_model(model, out)
        print(f"wrote clipper model directory {out}")


def cmd_similarity(args: argparse.Namespace) -> None:
    import torch

    from .images import load_images
    from .tokenizer import Tokenizer
    from .data.transforms import eval_transform

    if not args.texts:
        raise ValueError("--texts: give at least one text")
    model = _load(args)
    cfg = model.config
    pixels = torch.stack([eval_transform(cfg.vision)(im) for im in load_images(args.images)])
    tokens = Tokenizer(cfg.text.context_length)(args.texts)
    with torch.inference_mode():
        sims = model.encode_image(pixels, normalize=True) @ model.encode_text(tokens, normalize=True).T
        probs = (model.logit_scale.exp().clamp(max=100) * sims).softmax(dim=-1)
    width = max(len(Path(p).name) for p in args.images)
    print(" " * width + "".join(f"  {t[:18]:>18s}" for t in args.texts))
    for path, row, prow in zip(args.images, sims.tolist(), probs.tolist()):
        cells = "".join(f"  {s:+.3f} (p={p:4.2f})".rjust(20) for s, p in zip(row, prow))
        print(f"{Path(path).name:>{width}s}{cells}")


def cmd_data(args: argparse.Namespace) -> None:
    from .data import build, sources
    from .data.shards import write_shards

    if args.source == "fetch":
        from .data import emoji, fashion_mnist

        print(f"fashion-mnist: {fashion_mnist.find_root()}")
        font, cldr = emoji.find_files()
        print(f"emoji font: {font}\nCLDR annotations: {cldr[0].parents[1]}")
        return
    if args.source == "fashion-mnist":
        root = args.root
        if args.download:
            from .data.fashion_mnist import download_upstream

            root = download_upstream(Path(args.out) / "upstream")
        stats = build.build_fashion_mnist(args.out, root, args.seed, args.samples_per_shard or 5000)
    elif args.source == "emoji":
        stats = build.build_emoji(args.out, args.font, args.cldr_root, args.samples_per_shard or 500)
    elif args.source == "folder":
        stats = {"all": write_shards(sources.folder_samples(args.input), args.out, args.samples_per_shard or 1000)}
    else:
        stats = {"all": write_shards(sources.csv_samples(args.input, args.image_column, args.caption_column),
                                     args.out, args.samples_per_shard or 1000)}
    for split, s in stats.items():
        rejected = f", {s['rejected']} rejected ({s['rejected_by_reason']})" if s["rejected"] else ""
        print(f"{split}: {s['samples']} pairs in {s['shards']} shard(s){rejected}")
    print(f"wrote {args.out}")


def train_config_from_args(args: argparse.Namespace):
    """Preset, then --config file, then the flags, then --set FIELD=JSON overrides."""
    import dataclasses

    from .config import TrainConfig, from_dict, read_json, train_preset

    cfg = train_preset(args.preset) if args.preset else TrainConfig()
    if args.config:
        cfg = read_json(TrainConfig, args.config)
    data = dataclasses.asdict(cfg)
    for flag in TRAIN_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    for item in args.set or []:
        field, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare strings need no quotes
        *parents, leaf = field.split(".")
        target = data
        for part in parents:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"--set {field}: {part!r} is not a section of the training config")
            target = target[part]
        target[leaf] = value
    return from_dict(TrainConfig, data, "train").validate()


TRAIN_FLAGS = {"model": str, "init": str, "train_data": str, "eval_task": str, "eval_data": str, "loss": str,
               "batch_size": int, "accum_freq": int, "lr": float, "steps": int, "epochs": float,
               "minutes": float, "workers": int, "seed": int, "checkpoint_every": int, "eval_every": int,
               "device": str}


def cmd_train(args: argparse.Namespace) -> None:
    from .train import Trainer

    cfg = train_config_from_args(args)
    summary = Trainer(cfg, args.out, resume=args.resume).fit()
    print(json.dumps(summary))


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_task

    model = _load(args)
    metrics = evaluate_task(model, args.task, args.data, batch_size=args.batch_size, workers=args.workers)
    print(json.dumps({"model": args.model, "task": args.task, **metrics}))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipper", description="CLIP-style image-text models, fast on CPUs.")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("presets", help="list the model presets (clipper's and open_clip's ViT configs)")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("info", help="print a model's config and parameter counts")
    _add_model_args(p)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("convert", help="open_clip checkpoint <-> clipper model directory",
                       description="Writes an open_clip state dict when --out ends in .safetensors/.pt/.pth/.bin, "
                                   "else a clipper model directory.")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory or open_clip weights file")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("data", help="turn a data source into webdataset shards")
    data_sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    data_sub.add_parser("fetch", help="locate or fetch the Debian packages of the real sets (apt-get download)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (real sets: one subfolder per split)")
    common.add_argument("--samples-per-shard", type=int, help="samples per .tar shard")
    q = data_sub.add_parser("fashion-mnist", parents=[common], help="Fashion-MNIST (Debian package, folder or upstream)")
    q.add_argument("--root", help="folder with the four idx .gz files (default: Debian's dataset-fashion-mnist)")
    q.add_argument("--download", action="store_true", help="fetch the upstream files instead (needs a network)")
    q.add_argument("--seed", type=int, default=0, help="seed of the caption template draw")
    q = data_sub.add_parser("emoji", parents=[common], help="Noto Color Emoji glyphs named by Unicode CLDR")
    q.add_argument("--font", help="NotoColorEmoji.ttf (default: Debian's fonts-noto-color-emoji)")
    q.add_argument("--cldr-root", help="CLDR folder holding common/annotations (default: Debian's unicode-cldr-core)")
    q = data_sub.add_parser("folder", parents=[common], help="images with same-named .txt captions")
    q.add_argument("input", help="folder (searched recursively)")
    q = data_sub.add_parser("csv", parents=[common], help="CSV/TSV of image path and caption")
    q.add_argument("input", help="the .csv or .tsv file; image paths relative to its folder")
    q.add_argument("--image-column", default="image")
    q.add_argument("--caption-column", default="caption")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("train", help="contrastive training (also under torchrun)",
                       description="Settings: --preset, then --config FILE, then the flags below, then --set.")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, curves, final model)")
    p.add_argument("--preset", help="training preset: fmnist-tiny, emoji-small")
    p.add_argument("--config", help="TrainConfig JSON file")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    for flag, kind in TRAIN_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any TrainConfig field, JSON value (e.g. augment.crop_scale=[0.5,1.0])")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="protocol metrics: zero-shot Fashion-MNIST, emoji retrieval")
    _add_model_args(p)
    p.add_argument("--task", required=True, choices=["zeroshot-fmnist", "retrieval-emoji"])
    p.add_argument("--data", required=True, help="shards of the eval split (e.g. data/shards/fmnist/test)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("similarity", help="cosine similarity of images and texts")
    _add_model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--texts", nargs="+", default=[], help="texts to compare the images with")
    p.set_defaults(fn=cmd_similarity)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"clipper {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
