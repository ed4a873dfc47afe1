"""`clipper data`: a data source into webdataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import templates_from_args


def cmd_data(args: argparse.Namespace) -> None:
    from ..data import build, sources
    from ..data.shards import write_shards

    if args.source == "fetch":
        from ..data import emoji, fashion_mnist

        print(f"fashion-mnist: {fashion_mnist.find_root()}")
        font, cldr = emoji.find_files()
        print(f"emoji font: {font}\nCLDR annotations: {cldr[0].parents[1]}")
        from ..data import npm

        for style in npm.PACKAGES:  # the other emoji renderings (issue #18), with npm
            print(f"emoji {style}: {npm.package_tarball(style)}")
        return
    if args.source == "fashion-mnist":
        root = args.root
        if args.download:
            from ..data.fashion_mnist import download_upstream

            root = download_upstream(Path(args.out) / "upstream")
        stats = build.build_fashion_mnist(args.out, root, args.seed, args.samples_per_shard or 5000)
    elif args.source == "emoji":
        stats = build.build_emoji(args.out, args.font, args.cldr_root, args.samples_per_shard or 500,
                                  tuple(s.strip() for s in args.styles.split(",") if s.strip()))
    elif args.source == "clip-benchmark":
        from ..data.clip_benchmark import export_clip_benchmark

        s = export_clip_benchmark(args.input, args.out, args.split, templates_from_args(args), args.samples_per_shard or 1000)
        print(f"{s['type']}: {s['samples']} samples ({s['skipped']} skipped) in {args.out}/{args.split}; run "
              f"`clip_benchmark eval --dataset wds/NAME --dataset_root {args.out} --split {args.split} --task "
              f"zeroshot_{s['type']} ...`")
        return
    else:
        own = (sources.folder_samples(args.input, classes=args.classes_from_folders) if args.source == "folder" else
               sources.llava_samples(args.input, args.image_folder) if args.source == "llava" else
               sources.csv_samples(args.input, args.image_column, args.caption_column, label_column=args.label_column))
        stats = {"all": write_shards(own, args.out, args.samples_per_shard or 1000, classnames=own.classnames)}
        if own.classnames:
            print(f"{len(own.classnames)} classes (in {Path(args.out) / 'classnames.txt'}; `clipper eval --task "
                  f"zeroshot --data {args.out}` reads them)")
    for split, s in stats.items():
        rejected = f", {s['rejected']} rejected ({s['rejected_by_reason']})" if s["rejected"] else ""
        print(f"{split}: {s['samples']} pairs in {s['shards']} shard(s){rejected}")
    print(f"wrote {args.out}")


def add_parsers(sub) -> None:
    p = sub.add_parser("data", help="turn a data source into webdataset shards")
    data_sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    data_sub.add_parser("fetch", help="locate or fetch the Debian packages of the real sets (apt-get download)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (real sets: one subfolder per split)")
    common.add_argument("--samples-per-shard", type=int, help="samples per .tar shard (default: fashion-mnist 5000, emoji 500, "
                        "others 1000)")
    q = data_sub.add_parser("fashion-mnist", parents=[common], help="Fashion-MNIST (Debian package, folder or upstream)")
    q.add_argument("--root", help="folder with the four idx .gz files (default: Debian's dataset-fashion-mnist)")
    q.add_argument("--download", action="store_true", help="fetch the upstream files instead (needs a network)")
    q.add_argument("--seed", type=int, default=0, help="seed of the caption template draw (default: 0)")
    q = data_sub.add_parser("emoji", parents=[common], help="Noto Color Emoji glyphs named by Unicode CLDR")
    q.add_argument("--font", help="NotoColorEmoji.ttf (default: Debian's fonts-noto-color-emoji)")
    q.add_argument("--cldr-root", help="CLDR folder holding common/annotations (default: Debian's unicode-cldr-core)")
    q.add_argument("--styles", default="noto", help="renderings, comma-separated: noto (the Debian font), twemoji, "
                                                   "apple, facebook (npm's emoji-datasource-*, fetched with npm); "
                                                   "apple and facebook are never trained on: they go to val (the "
                                                   "training emoji) and test (default: noto)")
    q = data_sub.add_parser("folder", parents=[common], help="images with same-named .txt captions")
    q.add_argument("input", help="folder (searched recursively)")
    q.add_argument("--classes-from-folders", action="store_true",
                   help="label each image by its top folder (INPUT/CLASS/.../x.jpg; underscores read as spaces), "
                        "kept in the shards with classnames.txt for `clipper eval --task zeroshot`; an image "
                        "without a .txt gets its class name as caption (default: unlabelled)")
    q = data_sub.add_parser("csv", parents=[common], help="CSV/TSV of image path and caption")
    q.add_argument("input", help="the .csv or .tsv file; image paths relative to its folder")
    q.add_argument("--image-column", default="image", help="column of the image paths (default: image)")
    q.add_argument("--caption-column", default="caption", help="column of the captions (default: caption)")
    q.add_argument("--label-column", help="column of each row's class name, kept in the shards with "
                                          "classnames.txt for `clipper eval --task zeroshot` (default: unlabelled)")
    q = data_sub.add_parser("llava", parents=[common], help="LLaVA's instruction data: JSON/JSONL of image and "
                                                             "conversations (a llava decoder's `instructions`)")
    q.add_argument("input", help="the .json list or .jsonl file")
    q.add_argument("--image-folder", help="where the image paths are relative to, and stay inside (default: the "
                                          "file's folder)")
    q = data_sub.add_parser("clip-benchmark", parents=[common],
                            help="a shard set -> clip_benchmark's webdataset layout (classification when the set "
                                 "has classnames.txt, else retrieval), for `clip_benchmark eval --dataset wds/NAME "
                                 "--dataset_root OUT`")
    q.add_argument("input", help="the shards (folder, brace pattern or glob)")
    q.add_argument("--split", default="test", help="the split's folder name in OUT (default: test)")
    q.add_argument("--templates", help="zero-shot templates with {}, one per line (default: the set's "
                                       "templates.txt, else 'a photo of a {}.')")
    p.set_defaults(fn=cmd_data)
