"""Which of open_clip's pretrained (architecture, tag) pairs clipper runs, and how exactly.

For every architecture in `open_clip.list_pretrained()`: whether clipper translates its config
(else the reason), and, with --parity, open_clip's model with random weights (seed 0) against
clipper holding the same weights: max abs difference of normalised image and text embeddings
(one image, three texts) and whether the export back is open_clip's state dict tensor for tensor.
Architectures over --max-params parameters are counted but not built.

`--onnx NAME ...` also exports those architectures (random weights) with `clipper export --format
onnx`'s code and records the largest cosine distance ONNX Runtime gives against clipper.

`--only NAME ...` builds just those architectures and updates their rows in results/zoo.json.

    python benchmarks/zoo.py [--parity] [--max-params 1e9] [--onnx MobileCLIP2-S0 convnext_base ...]
    python benchmarks/zoo.py --parity --only coca_ViT-B-32 ViT-SO400M-14-SigLIP2 --max-params 1.2e9
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

import open_clip  # noqa: E402

from clipper.presets import preset  # noqa: E402
from clipper.errors import ConfigError  # noqa: E402
from clipper.interop.open_clip import from_open_clip_state_dict, to_open_clip_state_dict  # noqa: E402
from clipper.model import CLIP  # noqa: E402

TEXTS = ["a photo of a cat.", "", "a very small dog on a red mat!!"]


def _tokens(name: str, config) -> torch.Tensor:
    """open_clip's tokens of TEXTS; for a Hugging Face tokenizer (not available offline), random ids
    over the whole context with the last rows' tails as padding (0)."""
    if not config.text.tokenizer:
        return open_clip.get_tokenizer(name)(TEXTS)
    t = config.text
    ids = torch.randint(1, t.vocab_size, (len(TEXTS), t.context_length), generator=torch.Generator().manual_seed(2))
    ids[1, 3:] = 0
    ids[2, t.context_length // 2:] = 0
    return ids


def parity(name: str, max_params: float) -> dict:
    config = preset(name)
    if config.text.kind == "hf":  # open_clip needs the hub's config.json for these too (none offline)
        return {"parity": f"not built: the text tower is transformers' {config.text.hf_model} (hub config)"}
    with torch.device("meta"):
        n = sum(p.numel() for p in CLIP(config).parameters())
    if n > max_params:
        return {"params": n, "parity": f"not built: {n / 1e9:.2f}B parameters"}
    torch.manual_seed(0)
    oc = open_clip.create_model(name, pretrained=None).eval()
    ours = from_open_clip_state_dict(oc.state_dict(), config).eval()
    size = config.vision.image_size
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = _tokens(name, config)
    with torch.no_grad():
        diff = max(float((oc.encode_image(images, normalize=True) - ours.encode_image(images, normalize=True)).abs().max()),
                   float((oc.encode_text(tokens, normalize=True) - ours.encode_text(tokens, normalize=True)).abs().max()))
    exported = to_open_clip_state_dict(ours)
    exact = set(exported) == set(oc.state_dict()) and all(torch.equal(exported[k], v)
                                                          for k, v in oc.state_dict().items())
    return {"params": n, "max_abs_diff": diff, "export_exact": exact}


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {"default": value}


def onnx_check(name: str) -> dict:
    from clipper.interop.onnx_export import export_onnx

    torch.manual_seed(0)
    oc = open_clip.create_model(name, pretrained=None).eval()
    ours = from_open_clip_state_dict(oc.state_dict(), preset(name)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_onnx(ours, Path(tmp) / "onnx")
    row = {"max_cosine_distance": manifest["verified"]["max_cosine_distance"],
           "text_shape": manifest["graphs"]["text"]["shape"]}
    print(name, "onnx", row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parity", action="store_true", help="build each architecture and compare with open_clip")
    ap.add_argument("--max-params", type=float, default=1e9)
    ap.add_argument("--onnx", nargs="*", default=[], metavar="NAME", help="architectures to export to ONNX")
    ap.add_argument("--only", nargs="*", default=None, metavar="NAME", help="rebuild these rows of results/zoo.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tags = defaultdict(list)
    for arch, tag in open_clip.list_pretrained():
        tags[arch].append(tag)
    previous = json.loads(RESULTS.joinpath("zoo.json").read_text()) if args.only else {}
    rows = dict(previous.get("rows", {}))
    for arch in sorted(tags):
        if args.only is not None and arch not in args.only:
            continue
        try:
            config = preset(arch)
            row = {"status": "loads", "vision": config.vision.kind + (f" {config.vision.timm_model}"
                                                                      if config.vision.timm_model else ""),
                   "tokenizer": config.text.tokenizer or "clip-bpe"}
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            row = {"status": "refused", "reason": str(e)[:200]}
        row["pretrained"] = tags[arch]
        if args.parity and row["status"] == "loads":
            row |= parity(arch, args.max_params)
            print(arch, {k: v for k, v in row.items() if k != "pretrained"}, flush=True)
        rows[arch] = row
    pairs = sum(len(t) for t in tags.values())
    loads = [a for a, r in rows.items() if r["status"] == "loads"]
    results = {"open_clip": open_clip.__version__, "architectures": len(tags), "pretrained_pairs": pairs,
               "architectures_loading": len(loads), "pairs_loading": sum(len(tags[a]) for a in loads),
               "rows": rows}
    if args.parity:
        built = [r for r in rows.values() if "max_abs_diff" in r]
        results["built"] = len(built)
        results["max_abs_diff"] = max((r["max_abs_diff"] for r in built), default=None)
        results["all_exports_exact"] = all(r["export_exact"] for r in built)
    results["max_params"] = args.max_params if not args.only else {**_as_dict(previous.get("max_params", 1e9)),
                                                                   **{a: args.max_params for a in args.only}}
    results["onnx"] = previous.get("onnx", {}) | {name: onnx_check(name) for name in args.onnx}
    print({k: v for k, v in results.items() if k != "rows"})
    print("wrote", write_results("zoo", results))


if __name__ == "__main__":
    main()
