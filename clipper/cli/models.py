"""Verbs on model files: `presets`, `info`, `convert`, `export`."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..interop.onnx_model import OnnxCLIP
from .common import add_model_args, load_model_from_args


def cmd_presets(args: argparse.Namespace) -> None:
    """Model presets with their image tower, image size, tokenizer and decoder (and with --params
    their size); then the training presets."""
    import torch

    from ..presets import list_presets, preset
    from ..train_config import TRAIN_PRESETS
    from ..model import CLIP

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
    model = load_model_from_args(args)
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
    from ..checkpoint import save_model
    from ..interop.open_clip import save_open_clip_checkpoint
    from ..interop.open_clip_dir import save_open_clip_dir

    model = load_model_from_args(args)
    if isinstance(model, OnnxCLIP):
        raise ConfigError(f"{args.model}: an ONNX export holds graphs, not weights clipper or open_clip load; "
                          "convert the model it came from")
    out = Path(args.out)
    to = args.to or ("open_clip-file" if out.suffix in (".safetensors", ".pt", ".pth", ".bin") else "clipper")
    llava = model.decoder is not None and model.config.decoder.kind == "llava"
    if to != "clipper" and model.decoder is not None and model.config.decoder.kind != "coca" and \
            not (llava and to == "hf"):
        print("clipper convert: the caption decoder is clipper's own (open_clip has none): not exported",
              file=sys.stderr)
    if to == "open_clip-file":
        save_open_clip_checkpoint(model, out)
        print(f"wrote open_clip state dict {out}")
    elif to == "open_clip":
        save_open_clip_dir(model, out)
        print(f"wrote open_clip model folder {out} (open_clip.create_model_and_transforms('local-dir:{out}'))")
    elif to == "hf" and llava:  # the image tower and the language model behind it: transformers' LLaVA
        from ..vlm.build import write_llava_of

        write_llava_of(model, out)
        print(f"wrote transformers folder {out} (LlavaForConditionalGeneration.from_pretrained('{out}'))")
    elif to == "hf":
        from ..interop.hf import hf_config, save_hf_dir

        save_hf_dir(model, out)
        print(f"wrote transformers folder {out} ({hf_config(model)['architectures'][0]}.from_pretrained('{out}'))")
    else:
        save_model(model, out)
        print(f"wrote clipper model directory {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from ..interop.onnx_export import describe, export_onnx, quantize_onnx_export

    model = load_model_from_args(args)
    if isinstance(model, OnnxCLIP):
        if args.quantize != "int8":
            raise ConfigError(f"{args.model}: already an ONNX export (give --quantize int8 for its int8 graphs)")
        print(describe(quantize_onnx_export(args.model, args.out), args.out))
        return
    if model.decoder is not None:
        print("clipper export: the caption decoder is not exported (image and text towers only)", file=sys.stderr)
    print(describe(export_onnx(model, args.out, quantize=args.quantize), args.out))


def add_parsers(sub) -> None:
    p = sub.add_parser("presets", help="list the model presets (clipper's and open_clip's configs it builds) and "
                                       "the training presets")
    p.add_argument("names", nargs="*", help="only these presets (shell-style patterns: 'ViT-*-SigLIP*')")
    p.add_argument("--params", action="store_true", help="also count each model's parameters (builds each model "
                                                         "on the meta device: ~45 s for all of them)")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("info", help="print a model's config and parameter counts")
    add_model_args(p, precision=False)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("convert", help="between clipper model directories, open_clip folders or files and "
                                       "Hugging Face folders",
                       description="--to open_clip writes open_clip's local-dir folder (open_clip_config.json + "
                                   "open_clip_model.safetensors: open_clip and clip_benchmark load it as "
                                   "local-dir:OUT). --to hf writes a transformers CLIPModel or SiglipModel folder "
                                   "(from_pretrained(OUT)), or for a model with a llava decoder a "
                                   "LlavaForConditionalGeneration folder. Without --to: an open_clip state dict "
                                   "when --out ends in "
                                   ".safetensors/.pt/.pth/.bin, else a clipper model directory.")
    add_model_args(p, precision=False)
    p.add_argument("--out", required=True, help="output directory or open_clip weights file")
    p.add_argument("--to", choices=["clipper", "open_clip", "open_clip-file", "hf"],
                   help="what to write (default: by --out, see above)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="a model's towers as ONNX graphs (image.onnx, text.onnx) for runtimes without "
                                      "torch", description="Writes image.onnx (pixels -> normalised embeddings), "
                       "text.onnx (token ids, dynamic length -> embeddings) and onnx_export.json (preprocessing, "
                       "tokenizer, temperature, and the check against clipper made at export) into --out. Needs "
                       "the 'onnx' extra. `clipper embed/serve --model OUT` run it on ONNX Runtime.")
    add_model_args(p, precision=False)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (default; the only one)")
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--quantize", choices=["int8"], help="ONNX Runtime's dynamic int8 quantisation of the graphs "
                                                        "(also of an fp32 export folder given as --model; default: fp32 only)")
    p.set_defaults(fn=cmd_export)
