"""The `clipper` command. Thin: parse arguments, call the library, print; one clear line on bad input."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import sys
import typing
from pathlib import Path

from .data.remote import PIPE_ENV
from .errors import ClipperError, ConfigError, DataError
from .evaluate import EVAL_TASKS
from .generate import GenerationConfig
from .io import read_lines
from .onnx_model import OnnxCLIP
from .precision import PRECISIONS
from .version import __version__


def _add_model_args(p: argparse.ArgumentParser, required: bool = True, inference: bool = False,
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


def _flag_values(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _model_spec(args: argparse.Namespace) -> dict:
    """What `clipper.load` needs to load this model again (saved beside embeddings, for search)."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    pretrained = args.pretrained
    if pretrained and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer and Path(tokenizer).exists():
        tokenizer = str(Path(tokenizer).resolve())
    return {"model": model, "pretrained": pretrained, "quick_gelu": args.quick_gelu,
            "precision": getattr(args, "precision", None) or "fp32", "runtime": getattr(args, "runtime", None),
            "tokenizer": tokenizer}


def _load_spec(spec: dict, device: str | None = None):
    from .factory import load

    # folders embedded before --precision recorded "quantize": "int8"
    precision = spec.get("precision") or ("int8" if spec.get("quantize") == "int8" else "fp32")
    return load(spec["model"], pretrained=spec.get("pretrained"), quick_gelu=spec.get("quick_gelu"),
                precision=precision, runtime=spec.get("runtime"), device=_device(device, precision, spec),
                tokenizer=spec.get("tokenizer"))


def _device(device: str | None, precision: str, spec: dict) -> str:
    """--device: auto is this process's GPU (LOCAL_RANK under torchrun) when there is one and the
    model can use it (not int8, not ONNX graphs), else the CPU."""
    if device not in (None, "auto"):
        return device
    import torch

    if precision == "int8" or spec.get("runtime") == "onnx" or not torch.cuda.is_available():
        return "cpu"
    from .onnx_model import is_onnx_export

    return "cpu" if is_onnx_export(spec["model"]) else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def _load(args: argparse.Namespace):
    spec = _model_spec(args)
    model = _load_spec(spec, getattr(args, "device", None))
    if not Path(spec["model"]).exists() and not spec.get("pretrained"):
        print(f"clipper: {spec['model']} without --pretrained has random weights: its results mean nothing "
              "(pass --pretrained TAG_OR_FILE, or a trained model)", file=sys.stderr)
    return model


def cmd_presets(args: argparse.Namespace) -> None:
    """Model presets with their image tower, image size, tokenizer and decoder (and with --params
    their size); then the training presets."""
    import torch

    from .presets import list_presets, preset
    from .train_config import TRAIN_PRESETS
    from .model import CLIP

    rows = [("model preset", "image tower", "px", "tokenizer", "decoder") + (("parameters",) if args.params else ())]
    names = [n for n in list_presets() if not args.names or any(fnmatch.fnmatchcase(n, p) for p in args.names)]
    if not names:
        raise ConfigError(f"no preset matches {' '.join(args.names)} (clipper presets lists them all)")
    for name in names:
        config = preset(name)
        v = config.vision
        tower = {"resnet": f"resnet {'-'.join(map(str, v.stages))}", "timm": f"timm {v.timm_model}"}.get(
            v.kind, f"vit {v.layers}x{v.width}/{v.patch_size}" + (f" {v.pool}-pool" if v.pool in ("attn", "map") else ""))
        row = (name, tower, str(v.image_size), config.text.tokenizer or "clip-bpe",
               config.decoder.kind if config.decoder else "-")
        if args.params:
            with torch.device("meta"):  # counted without allocating the weights
                row += (f"{sum(p.numel() for p in CLIP(config).parameters()) / 1e6:.1f}M",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print("\ntraining presets (clipper train / train-captioner --preset NAME):")
    for name, values in TRAIN_PRESETS.items():
        print(f"  {name}: objective {values.get('objective', 'contrastive')}, model {values.get('model', '(--init)')}")


def cmd_info(args: argparse.Namespace) -> None:
    model = _load(args)
    if isinstance(model, OnnxCLIP):  # an ONNX export folder
        print(json.dumps({"config": model.config.to_dict(), "runtime": "onnx",
                          **{k: model.manifest[k] for k in ("quantize", "verified", "exported_with")}}, indent=2))
        return
    n_vis = sum(p.numel() for p in model.visual.parameters())
    n_txt = sum(p.numel() for p in model.text.parameters())
    print(json.dumps({"config": model.config.to_dict(), "parameters": {
        "visual": n_vis, "text": n_txt, "total": sum(p.numel() for p in model.parameters())}}, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    """Any model clipper loads -> a clipper directory, an open_clip local-dir folder or file, or a
    transformers folder."""
    from .checkpoint import save_model
    from .interop import save_open_clip_checkpoint
    from .open_clip_dir import save_open_clip_dir

    model = _load(args)
    if isinstance(model, OnnxCLIP):
        raise ConfigError(f"{args.model}: an ONNX export holds graphs, not weights clipper or open_clip load; "
                          "convert the model it came from")
    out = Path(args.out)
    to = args.to or ("open_clip-file" if out.suffix in (".safetensors", ".pt", ".pth", ".bin") else "clipper")
    if to != "clipper" and model.decoder is not None and model.config.decoder.kind != "coca":
        print("clipper convert: the caption decoder is clipper's own (open_clip has none): not exported",
              file=sys.stderr)
    if to == "open_clip-file":
        save_open_clip_checkpoint(model, out)
        print(f"wrote open_clip state dict {out}")
    elif to == "open_clip":
        save_open_clip_dir(model, out)
        print(f"wrote open_clip model folder {out} (open_clip.create_model_and_transforms('local-dir:{out}'))")
    elif to == "hf":
        from .hf import hf_config, save_hf_dir

        save_hf_dir(model, out)
        print(f"wrote transformers folder {out} ({hf_config(model)['architectures'][0]}.from_pretrained('{out}'))")
    else:
        save_model(model, out)
        print(f"wrote clipper model directory {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from .onnx_export import describe, export_onnx, quantize_onnx_export

    model = _load(args)
    if isinstance(model, OnnxCLIP):
        if args.quantize != "int8":
            raise ConfigError(f"{args.model}: already an ONNX export (give --quantize int8 for its int8 graphs)")
        print(describe(quantize_onnx_export(args.model, args.out), args.out))
        return
    if model.decoder is not None:
        print("clipper export: the caption decoder is not exported (image and text towers only)", file=sys.stderr)
    print(describe(export_onnx(model, args.out, quantize=args.quantize), args.out))


def cmd_similarity(args: argparse.Namespace) -> None:
    from .embed import embed_images, embed_texts

    if not args.texts:
        raise ConfigError("--texts: give at least one text")
    model = _load(args)
    sims = embed_images(model, args.images, to_numpy=False) @ embed_texts(model, args.texts, to_numpy=False).T
    probs = (model.scale() * sims).softmax(dim=-1)
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
        from .data import npm

        for style in npm.PACKAGES:  # the other emoji renderings (issue #18), with npm
            print(f"emoji {style}: {npm.package_tarball(style)}")
        return
    if args.source == "fashion-mnist":
        root = args.root
        if args.download:
            from .data.fashion_mnist import download_upstream

            root = download_upstream(Path(args.out) / "upstream")
        stats = build.build_fashion_mnist(args.out, root, args.seed, args.samples_per_shard or 5000)
    elif args.source == "emoji":
        stats = build.build_emoji(args.out, args.font, args.cldr_root, args.samples_per_shard or 500,
                                  tuple(s.strip() for s in args.styles.split(",") if s.strip()))
    elif args.source == "clip-benchmark":
        from .data.clip_benchmark import export_clip_benchmark

        s = export_clip_benchmark(args.input, args.out, args.split, _templates(args), args.samples_per_shard or 1000)
        print(f"{s['type']}: {s['samples']} samples ({s['skipped']} skipped) in {args.out}/{args.split}; run "
              f"`clip_benchmark eval --dataset wds/NAME --dataset_root {args.out} --split {args.split} --task "
              f"zeroshot_{s['type']} ...`")
        return
    else:
        own = (sources.folder_samples(args.input, classes=args.classes_from_folders) if args.source == "folder" else
               sources.csv_samples(args.input, args.image_column, args.caption_column, label_column=args.label_column))
        stats = {"all": write_shards(own, args.out, args.samples_per_shard or 1000, classnames=own.classnames)}
        if own.classnames:
            print(f"{len(own.classnames)} classes (in {Path(args.out) / 'classnames.txt'}; `clipper eval --task "
                  f"zeroshot --data {args.out}` reads them)")
    for split, s in stats.items():
        rejected = f", {s['rejected']} rejected ({s['rejected_by_reason']})" if s["rejected"] else ""
        print(f"{split}: {s['samples']} pairs in {s['shards']} shard(s){rejected}")
    print(f"wrote {args.out}")


def train_config_from_args(args: argparse.Namespace):
    """Preset, then --config file, then the flags, then --set FIELD=JSON overrides."""
    from .run_config import merge_train_config

    overrides = _flag_values(args, args.config_fields)
    if args.verb == "train-captioner":
        overrides["objective"] = "caption"
    return merge_train_config(args.preset, args.config, overrides, args.set or [])


def cmd_train(args: argparse.Namespace) -> None:
    from .train import Trainer

    cfg = train_config_from_args(args)
    summary = Trainer(cfg, args.out, resume=args.resume).fit()
    print(json.dumps(summary))


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


def _templates(args: argparse.Namespace) -> list[str] | None:
    from .prompts import check_templates

    return check_templates(read_lines(args.templates, "templates"), args.templates) if args.templates else None


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_task

    from .data.shards import CLASSNAMES_FILE, read_set_lines

    # a labelled set names its classes (classnames.txt); checked before the model is loaded
    classnames = _labels(args, required=args.task == "zeroshot" and read_set_lines(args.data, CLASSNAMES_FILE) is None)
    model = _load(args)
    metrics = evaluate_task(model, args.task, args.data, batch_size=args.batch_size, workers=args.workers,
                            classnames=classnames, templates=_templates(args), style=args.style)
    if metrics.get("skipped"):
        print(f"clipper eval: {metrics['skipped_summary']}", file=sys.stderr)
    print(json.dumps({"model": args.model, "task": args.task, **metrics}))


def cmd_embed(args: argparse.Namespace) -> None:
    from .embed_dir import embed_folder, embed_text_file

    if args.input is None and args.texts is None:
        raise ConfigError("give INPUT (images) and/or --texts FILE")
    share = _share(args.part)
    model, spec = _load(args), _model_spec(args)
    if args.input is not None:
        m = embed_folder(model, spec, args.input, args.out, dtype=args.dtype, batch_size=args.batch_size,
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
        m = embed_text_file(model, spec, args.texts, args.out, dtype=args.dtype)
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
    from .data.inputs import list_images
    from .embed import classify_embeddings, embed_items

    labels = _labels(args, required=True)
    items = [item for spec in args.images for item in list_images(spec)[0]]
    model = _load(args)
    embedded = embed_items(model, items, args.batch_size, args.workers, progress=len(items) > args.batch_size)
    for i, why in embedded.failed:
        print(f"clipper classify: skipped {items[i].id}: {why}", file=sys.stderr)
    if not embedded.kept:
        raise DataError("no readable image to classify")
    result = classify_embeddings(model, embedded.embeddings, labels, _templates(args), k=args.k)
    for i, top in zip(embedded.kept, result.top):
        if args.json:
            print(json.dumps({"image": items[i].id, "top": [{"label": l, "prob": round(p, 6)} for l, p in top]}))
        else:
            print(f"{items[i].id}\t" + "  ".join(f"{l} ({p:.3f})" for l, p in top))


def cmd_caption(args: argparse.Namespace) -> None:
    from .data.inputs import list_images
    from .generate import caption

    items = [item for spec in args.images for item in list_images(spec)[0]]
    options = _flag_values(args, args.config_fields)
    model = _load(args)
    captions = caption(model, [item.path for item in items], args.prompt, do_sample=args.sample, **options)
    for item, text in zip(items, captions):
        texts = text if isinstance(text, list) else [text]
        if args.json:
            print(json.dumps({"image": item.id, "captions": texts}, ensure_ascii=False))
        else:
            print(f"{item.id}\t" + "\t".join(texts))


def served_name(model: str) -> str:
    """The id clients name the model by: its folder's name (a run's, for RUN/model), or the preset."""
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def cmd_serve(args: argparse.Namespace) -> None:
    import importlib.util
    import os

    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise ConfigError("clipper serve needs FastAPI and uvicorn: pip install 'clipper[serve]'")
    from .serve.app import serve
    from .serve.service import Service
    from .serve.config import Access, Limits

    hosts = args.allowed_hosts.split(",") if args.allowed_hosts else ["127.0.0.1", "localhost", "::1", args.host]
    access = Access(api_key=args.api_key or os.environ.get("CLIPPER_API_KEY") or None,
                    allowed_hosts=() if "*" in hosts else tuple(h.strip() for h in hosts if h.strip()),
                    cors_origins=tuple(o.rstrip("/") for o in args.cors_origin))
    model = _load(args)
    service = Service(model, args.served_model_name or served_name(args.model), args.index,
                      Limits(**_flag_values(args, args.config_fields)),
                      max_batch=args.max_batch, access=access, media_roots=args.media_root or None)
    print(f"clipper serve: http://{args.host}:{args.port}/ (model {args.model}"
          + (f", index {args.index})" if args.index else ")"), flush=True)
    serve(service, args.host, args.port)


def cmd_index(args: argparse.Namespace) -> None:
    from .embed_dir import read_ids
    from .index import Index, load_vectors

    folder = Path(args.emb_dir)
    vectors = load_vectors(folder / "img_emb.npy")
    read_ids(folder, len(vectors))  # search shows these rows: they must be there, one per vector
    index = Index.build(vectors, args.kind, hnsw_m=args.hnsw_m, ef_search=args.ef_search, ivf_lists=args.ivf_lists,
                        nprobe=args.nprobe, pq_bytes=args.pq_bytes, rerank=args.rerank)
    index.save(folder)
    print(f"{args.kind} index of {len(index)} {index.dim}-d vectors in {folder}")


def cmd_search(args: argparse.Namespace) -> None:
    from .embed import embed_images, embed_texts
    from .embed_dir import check_same_model, open_index

    if (args.query is None) == (args.image is None):
        raise ConfigError("give a text QUERY or --image PATH (one of them)")
    folder = Path(args.index)
    index, ids, manifest = open_index(folder)
    if args.model:
        spec = _model_spec(args)
    else:
        spec = manifest["model"]
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
            raise DataError(f"{folder}/embed.json: 'model' does not say how to load the model; pass --model")
        if not Path(spec["model"]).exists() and not spec.get("pretrained"):
            raise DataError(f"{folder} was embedded with a randomly initialised {spec['model']}: "
                            "its queries cannot be embedded again; pass --model")
    model = _load_spec(spec, args.device)
    check_same_model(folder, manifest, index.dim, model)
    query = embed_texts(model, [args.query]) if args.query is not None else embed_images(model, [args.image])
    result = index.search(query, args.k)
    for rank, (score, i) in enumerate(result.hits(0), 1):
        row = ids[i]
        if args.json:
            print(json.dumps({"rank": rank, "score": round(score, 6), **row}, ensure_ascii=False))
        else:
            print(f"{rank:3d}  {score:.4f}  {row['id']}" + (f"  {row['caption']}" if row.get("caption") else ""))


def _add_train_args(p: argparse.ArgumentParser, presets: str) -> None:
    from .train_config import TrainConfig

    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, curves, final model)")
    p.add_argument("--preset", help=f"training preset: {presets} (default: none: TrainConfig's defaults)")
    p.add_argument("--config", help="TrainConfig JSON file (its fields override the preset's; default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any TrainConfig field, JSON value, nested with dots (e.g. augment.crop_scale=[0.5,1.0], "
                        "decoder.layers=3); applied last; repeatable (default: none)")
    p.set_defaults(fn=cmd_train, config_fields=add_config_flags(p, TrainConfig))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipper", description="CLIP-style image-text models, fast on CPUs.")
    ap.add_argument("--version", action="version", version=f"clipper {__version__}")
    ap.add_argument("--allow-pipe", action="store_true",
                    help="data specs typed here may be pipe:COMMAND shards, run in a shell (names found in folders, "
                         "globs, list and id files never are; sets CLIPPER_ALLOW_PIPE=1 for this run)")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("presets", help="list the model presets (clipper's and open_clip's configs it builds) and "
                                       "the training presets")
    p.add_argument("names", nargs="*", help="only these presets (shell-style patterns: 'ViT-*-SigLIP*')")
    p.add_argument("--params", action="store_true", help="also count each model's parameters (builds each model "
                                                         "on the meta device: ~45 s for all of them)")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("info", help="print a model's config and parameter counts")
    _add_model_args(p, precision=False)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("convert", help="between clipper model directories, open_clip folders or files and "
                                       "Hugging Face folders",
                       description="--to open_clip writes open_clip's local-dir folder (open_clip_config.json + "
                                   "open_clip_model.safetensors: open_clip and clip_benchmark load it as "
                                   "local-dir:OUT). --to hf writes a transformers CLIPModel or SiglipModel folder "
                                   "(from_pretrained(OUT)). Without --to: an open_clip state dict when --out ends in "
                                   ".safetensors/.pt/.pth/.bin, else a clipper model directory.")
    _add_model_args(p, precision=False)
    p.add_argument("--out", required=True, help="output directory or open_clip weights file")
    p.add_argument("--to", choices=["clipper", "open_clip", "open_clip-file", "hf"],
                   help="what to write (default: by --out, see above)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="a model's towers as ONNX graphs (image.onnx, text.onnx) for runtimes without "
                                      "torch", description="Writes image.onnx (pixels -> normalised embeddings), "
                       "text.onnx (token ids, dynamic length -> embeddings) and onnx_export.json (preprocessing, "
                       "tokenizer, temperature, and the check against clipper made at export) into --out. Needs "
                       "the 'onnx' extra. `clipper embed/serve --model OUT` run it on ONNX Runtime.")
    _add_model_args(p, precision=False)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (default; the only one)")
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--quantize", choices=["int8"], help="ONNX Runtime's dynamic int8 quantisation of the graphs "
                                                        "(also of an fp32 export folder given as --model; default: fp32 only)")
    p.set_defaults(fn=cmd_export)

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
    q = data_sub.add_parser("clip-benchmark", parents=[common],
                            help="a shard set -> clip_benchmark's webdataset layout (classification when the set "
                                 "has classnames.txt, else retrieval), for `clip_benchmark eval --dataset wds/NAME "
                                 "--dataset_root OUT`")
    q.add_argument("input", help="the shards (folder, brace pattern or glob)")
    q.add_argument("--split", default="test", help="the split's folder name in OUT (default: test)")
    q.add_argument("--templates", help="zero-shot templates with {}, one per line (default: the set's "
                                       "templates.txt, else 'a photo of a {}.')")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("train", help="contrastive training (also under torchrun)",
                       description="Settings: --preset, then --config FILE, then the flags below, then --set.")
    _add_train_args(p, "fmnist-tiny, emoji-small")

    p = sub.add_parser("train-captioner", help="train a caption decoder on a model's image tower",
                       description="The caption objective of `clipper train` (same flags): --init names the "
                                   "trained model; the captioner presets freeze its image tower (--no-lock-image "
                                   "trains it too).")
    _add_train_args(p, "emoji-captioner, fmnist-captioner")

    p = sub.add_parser("caption", help="caption images with a model that has a decoder")
    p.add_argument("images", nargs="+", help="image files, folders or list files")
    _add_model_args(p)
    p.add_argument("--prompt", help="text the captions start with (default: none)")
    p.add_argument("--sample", action="store_true", help="sample (temperature, top-k, top-p) instead of greedy/beam")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(fn=cmd_caption, config_fields=add_config_flags(p, GenerationConfig, skip=("do_sample",)))

    labels = argparse.ArgumentParser(add_help=False)
    labels.add_argument("--labels", help="class names, comma-separated (eval default: the set's classnames.txt)")
    labels.add_argument("--labels-file", help="class names, one per line (default: none)")
    labels.add_argument("--templates", help="prompt templates with {} for the name, one per line "
                                            "(default: 'a photo of a {}.'; eval: the set's templates.txt when it has "
                                            "one); several are averaged")

    p = sub.add_parser("eval", parents=[labels], help="zero-shot accuracy, retrieval recall or caption metrics",
                       description="Tasks (the *-fmnist and *-emoji ones follow docs/protocol.md), and the shards "
                                   "each runs on: " + "; ".join(f"{name}: {t.data}" for name, t in EVAL_TASKS.items())
                                   + ". Prints JSON.")
    _add_model_args(p)
    p.add_argument("--task", required=True, choices=list(EVAL_TASKS), help="the evaluation (see above)")
    p.add_argument("--style", help="emoji shards of several renderings (`clipper data emoji --styles`): evaluate "
                                   "on one (noto, twemoji, apple, facebook); cross-style-emoji: the gallery's "
                                   "(default: every sample)")
    p.add_argument("--data", required=True, help="shards of the eval split (e.g. data/shards/fmnist/test)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (default: 0)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("embed", help="embed images (file, folder, list file, shards) and/or texts into .npy",
                       description="Writes img_emb.npy + ids.jsonl (row-aligned) and skipped.jsonl into --out; "
                                   "an interrupted run resumes where it stopped. --texts FILE: text_emb.npy + "
                                   "texts.jsonl.")
    p.add_argument("input", nargs="?", help="image file, folder (recursive), list file (.txt: one path per line), "
                                            "or shards (.tar, folder of .tar, brace pattern)")
    _add_model_args(p, inference=True)
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
    _add_model_args(p, inference=True)
    p.add_argument("-k", type=int, default=5, help="labels shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(fn=cmd_classify)

    p = sub.add_parser("serve", help="HTTP API (embeddings, classify, caption, search) and a demo page",
                       description="Needs the 'serve' extra (FastAPI, uvicorn). Bound to 127.0.0.1 unless --host.")
    _add_model_args(p)
    p.add_argument("--index", help="folder from `clipper embed` + `clipper index`, for /search (default: "
                                     "none, /search answers 404)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="items per batched forward pass (default: 32)")
    p.add_argument("--served-model-name", help="the model's id in /v1/models and the 'model' field of "
                                               "/v1/embeddings (default: the model folder's name; RUN/model: RUN's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or 'X-API-Key: KEY') on every path but "
                                     "/health and the page / (default: $CLIPPER_API_KEY, else none)")
    p.add_argument("--allowed-hosts", help="comma-separated Host names requests may carry, '*' for any "
                                           "(default: loopback names and --host)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="another site whose pages may call this server (scheme://host[:port]; repeatable); "
                        "cross-site requests from others are refused (default: none)")
    p.add_argument("--media-root", action="append", default=[], metavar="DIR",
                   help="folder /thumbnail may read images from (repeatable; default: the --index folder and "
                        "the folder it was embedded from)")
    from .serve.config import Limits

    p.set_defaults(fn=cmd_serve, config_fields=add_config_flags(p, Limits))

    p = sub.add_parser("index", help="build a search index over `clipper embed` output")
    p.add_argument("emb_dir", help="folder written by `clipper embed`")
    p.add_argument("--kind", choices=["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq"],
                   default="exact", help="exact: torch matmul (default); faiss-*: needs faiss-cpu (extra 'index'); "
                                         "faiss-ivfpq: compressed codes in memory, candidates re-ranked exactly")
    p.add_argument("--hnsw-m", type=int, default=32, help="faiss-hnsw: graph degree (default: 32)")
    p.add_argument("--ef-search", type=int, default=128, help="faiss-hnsw: search breadth (default: 128)")
    p.add_argument("--ivf-lists", type=int, help="faiss-ivf: cells (default: about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32, help="faiss-ivf/ivfpq: cells visited per query (default: 32)")
    p.add_argument("--pq-bytes", type=int, help="faiss-ivfpq: code bytes per vector, a divisor of the dimension "
                                                "(default: dimension / 8)")
    p.add_argument("--rerank", type=int, default=8, help="faiss-ivfpq: candidates per result re-scored exactly "
                                                         "(default: 8)")
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser("search", help="nearest images to a text or an image")
    p.add_argument("index", help="folder of embeddings with an index (`clipper index`)")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="image query instead of text (default: none)")
    p.add_argument("-k", type=int, default=10, help="results (default: 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    _add_model_args(p, required=False)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("similarity", help="cosine similarity of images and texts")
    _add_model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--texts", nargs="+", default=[], help="texts to compare the images with (default: none)")
    p.set_defaults(fn=cmd_similarity)
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


if __name__ == "__main__":
    sys.exit(main())
