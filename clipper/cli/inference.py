"""Verbs that run a model over inputs: `embed`, `classify`, `caption`, `similarity`, `eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from ..evaluate import EVAL_TASKS
from ..generate import GenerationConfig
from ..io import read_lines
from .common import (add_config_flags, add_datastore_arg, add_model_args, flag_values, load_model_from_args,
                     model_spec, templates_from_args, with_datastore)


def _labels(args: argparse.Namespace, required: bool) -> list[str] | None:
    if args.labels and args.labels_file:
        raise ConfigError("give --labels or --labels-file, not both")
    if args.labels_file:
        return read_lines(args.labels_file, "labels")
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        if labels:
            return labels
    if required:
        raise ConfigError("--labels: give the class names (comma-separated) or --labels-file (a set made with "
                          "--classes-from-folders or --label-column has them)")
    return None


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluate import evaluate_task

    from ..data.shards import CLASSNAMES_FILE, read_set_lines

    # a labelled set names its classes (classnames.txt); checked before the model is loaded
    classnames = _labels(args, required=args.task == "zeroshot" and read_set_lines(args.data, CLASSNAMES_FILE) is None)
    model = load_model_from_args(args)
    with_datastore(model, args)
    metrics = evaluate_task(model, args.task, args.data, batch_size=args.batch_size, workers=args.workers,
                            classnames=classnames, templates=templates_from_args(args), style=args.style)
    if metrics.get("skipped"):
        print(f"clipper eval: {metrics['skipped_summary']}", file=sys.stderr)
    print(json.dumps({"model": args.model, "task": args.task, **metrics}))


def cmd_embed(args: argparse.Namespace) -> None:
    from ..embed_dir import embed_folder, embed_text_file

    if args.input is None and args.texts is None:
        raise ConfigError("give INPUT (images) and/or --texts FILE")
    share = _share(args.part)
    model, spec = load_model_from_args(args), model_spec(args)
    if args.input is not None:
        m = embed_folder(model, spec.to_dict(), args.input, args.out, dtype=args.dtype, batch_size=args.batch_size,
                         workers=args.workers, exact_decode=args.exact_decode, part_size=args.part_size,
                         share=share)
        if not m.get("images") and m.get("joined") is False:
            print(f"part {share[0]}/{share[1]} done ({m['parts_done']} of the {m['parts']} parts of {args.out} are); "
                  + ("another process is joining them (if it was killed, run this without --part to join)"
                     if "joining" in m else "the process that finishes the last one joins them"))
            return
        print(f"{m['images']} image(s) -> {Path(args.out) / 'img_emb.npy'} ({m['dim']}-d {m['dtype']})"
              + (f"; {m['skipped']} skipped, listed in {Path(args.out) / 'skipped.jsonl'}" if m["skipped"] else ""))
    if args.texts is not None:
        m = embed_text_file(model, spec.to_dict(), args.texts, args.out, dtype=args.dtype)
        print(f"{m['texts']} text(s) -> {Path(args.out) / 'text_emb.npy'}")


def _share(part: str | None) -> tuple[int, int]:
    """--part i/N, else torchrun's RANK/WORLD_SIZE, else the whole run (0, 1)."""
    if part is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    i, _, n = part.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ConfigError(f"--part {part!r}: expected i/N with 0 <= i < N (e.g. 0/4 .. 3/4)")
    return int(i), int(n)


def cmd_classify(args: argparse.Namespace) -> None:
    from ..data.inputs import list_images
    from ..embed import classify_embeddings, embed_items

    labels = _labels(args, required=True)
    items = [item for spec in args.images for item in list_images(spec)[0]]
    model = load_model_from_args(args)
    embedded = embed_items(model, items, args.batch_size, args.workers, progress=len(items) > args.batch_size)
    for i, why in embedded.failed:
        print(f"clipper classify: skipped {items[i].id}: {why}", file=sys.stderr)
    if not embedded.kept:
        raise DataError("no readable image to classify")
    result = classify_embeddings(model, embedded.embeddings, labels, templates_from_args(args), k=args.k)
    for i, top in zip(embedded.kept, result.top):
        if args.json:
            print(json.dumps({"image": items[i].id, "top": [{"label": l, "prob": round(p, 6)} for l, p in top]}))
        else:
            print(f"{items[i].id}\t" + "  ".join(f"{l} ({p:.3f})" for l, p in top))


def cmd_caption(args: argparse.Namespace) -> None:
    from ..data.inputs import list_images

    items = [item for spec in args.images for item in list_images(spec)[0]]
    options = flag_values(args, args.config_fields)
    model = load_model_from_args(args)  # a captioner (the prompt starts its captions) or a VLM (it answers it)
    with_datastore(model, args)
    captions = model.caption([item.path for item in items], args.prompt, do_sample=args.sample, **options)
    for item, text in zip(items, captions):
        texts = text if isinstance(text, list) else [text]
        if args.json:
            print(json.dumps({"image": item.id, "captions": texts}, ensure_ascii=False))
        else:
            print(f"{item.id}\t" + "\t".join(texts))


def cmd_similarity(args: argparse.Namespace) -> None:
    from ..embed import embed_images, embed_texts

    if not args.texts:
        raise ConfigError("--texts: give at least one text")
    model = load_model_from_args(args)
    sims = embed_images(model, args.images, to_numpy=False) @ embed_texts(model, args.texts, to_numpy=False).T
    probs = (model.scale() * sims).softmax(dim=-1)
    width = max(len(Path(p).name) for p in args.images)
    print(" " * width + "".join(f"  {t[:18]:>18s}" for t in args.texts))
    for path, row, prow in zip(args.images, sims.tolist(), probs.tolist()):
        cells = "".join(f"  {s:+.3f} (p={p:4.2f})".rjust(20) for s, p in zip(row, prow))
        print(f"{Path(path).name:>{width}s}{cells}")


def add_parsers(sub, labels: argparse.ArgumentParser) -> None:
    p = sub.add_parser("caption", help="caption images with a model that has a decoder, or a vision-language model")
    p.add_argument("images", nargs="+", help="image files, folders or list files")
    add_model_args(p)
    p.add_argument("--prompt", help="text the captions start with (default: none); a vision-language model's "
                                    "question (default: 'Describe this image.')")
    p.add_argument("--sample", action="store_true", help="sample (temperature, top-k, top-p) instead of greedy/beam")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    add_datastore_arg(p)
    p.set_defaults(fn=cmd_caption, config_fields=add_config_flags(p, GenerationConfig, skip=("do_sample",)))

    p = sub.add_parser("eval", parents=[labels], help="zero-shot accuracy, retrieval recall or caption metrics",
                       description="Tasks (the *-fmnist and *-emoji ones follow docs/protocol.md), and the shards "
                                   "each runs on: " + "; ".join(f"{name}: {t.data}" for name, t in EVAL_TASKS.items())
                                   + ". Prints JSON.")
    add_model_args(p)
    p.add_argument("--task", required=True, choices=list(EVAL_TASKS), help="the evaluation (see above)")
    p.add_argument("--style", help="emoji shards of several renderings (`clipper data emoji --styles`): evaluate "
                                   "on one (noto, twemoji, apple, facebook); cross-style-emoji: the gallery's "
                                   "(default: every sample)")
    p.add_argument("--data", required=True, help="shards of the eval split (e.g. data/shards/fmnist/test)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (default: 0)")
    add_datastore_arg(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("embed", help="embed images (file, folder, list file, shards) and/or texts into .npy",
                       description="Writes img_emb.npy + ids.jsonl (row-aligned) and skipped.jsonl into --out; "
                                   "an interrupted run resumes where it stopped. --texts FILE: text_emb.npy + "
                                   "texts.jsonl.")
    p.add_argument("input", nargs="?", help="image file, folder (recursive), list file (.txt: one path per line), "
                                            "or shards (.tar, folder of .tar, brace pattern)")
    add_model_args(p, inference=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--texts", help="UTF-8 file of texts to embed, one per line (default: none)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the stored vectors (default: float16)")
    p.add_argument("--part-size", type=int, default=1024,
                   help="images per part written as it completes: an interrupted run redoes at most one part "
                        "(default: 1024)")
    p.add_argument("--exact-decode", action="store_true",
                   help="decode JPEGs at full size (default: at a reduced scale when twice the model size)")
    p.add_argument("--part", help="i/N (0 <= i < N): embed every N-th part from part i, for N processes sharing "
                                  "--out on one filesystem (SLURM arrays, several machines); the one that "
                                  "finishes last joins the parts. Under torchrun: RANK/WORLD_SIZE (default: all)")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("classify", parents=[labels], help="zero-shot labels for images from class names")
    p.add_argument("images", nargs="+", help="image files, folders or list files")
    add_model_args(p, inference=True)
    p.add_argument("-k", type=int, default=5, help="labels shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(fn=cmd_classify)

    p = sub.add_parser("similarity", help="cosine similarity of images and texts")
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--texts", nargs="+", default=[], help="texts to compare the images with (default: none)")
    p.set_defaults(fn=cmd_similarity)
