"""ViT-B-32 @ 224, batch 64, 2 threads: clipper vs open_clip on the same weights, in one run.

Images/s and texts/s for each and the ratios, plus the largest cosine distance between their
normalised outputs. Texts are distinct realistic prompts ("a photo of a {label}, number {i}.")
and, separately, distinct texts that fill the whole 77-token context (where truncation saves nothing).

`--runtimes` adds, in the same interleaved rounds: clipper int8 and bf16 (`--precision`; bf16 is
measured only on a CPU with native bf16, or emulated with `--force-bf16`, to show why it is
refused there) and clipper's ONNX export on ONNX Runtime, fp32 and int8 (exported to a temporary
folder); each with its largest cosine distance to clipper fp32.

`--transformers` adds Hugging Face transformers' CLIPModel / SiglipModel holding the same weights
(clipper's export, `clipper convert --to hf`), with the ratio of clipper to it.

A model whose text tower reads a Hugging Face tokenizer (SigLIP's; not available offline) gets
random ids instead: prompt-length rows padded to the context, and full rows.
Results: embed_model.json for ViT-B-32, else embed_model_<model>.json.

    python benchmarks/embed_model.py [--model ViT-B-32] [--repeats 5] [--runtimes [--force-bf16]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rates, write_results  # noqa: E402

from clipper.interop.open_clip import from_open_clip_state_dict  # noqa: E402
from clipper.presets import preset  # noqa: E402

LABELS = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
          "cat", "dog", "red apple", "golden retriever puppy", "mountain bike", "cup of coffee"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", action="store_true", help="also int8, bf16 and ONNX Runtime fp32/int8")
    ap.add_argument("--force-bf16", action="store_true", help="measure bf16 where it is not native (emulated)")
    ap.add_argument("--transformers", action="store_true", help="also transformers' model on the same weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    oc = open_clip.create_model(args.model, pretrained=None).eval()
    config = preset(args.model)
    ours = from_open_clip_state_dict(oc.state_dict(), config).eval()
    size = config.vision.image_size
    images = torch.randn(args.batch, 3, size, size)
    tok_short, tok_long = _texts(args.model, config, args.batch)

    results = {"model": args.model, "batch": args.batch, "image_size": size,
               "towers": {"vision": config.vision.kind + (f" ({config.vision.timm_model})" if config.vision.timm_model
                                                          else ""), "text": "clipper"}}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        encoders = {"open_clip": oc, "clipper": ours}
        if args.runtimes:
            encoders.update(_runtimes(ours, Path(tmp), args, results))
        if args.transformers:
            encoders["transformers"] = _transformers(ours, Path(tmp), results)
        cos = {
            "image": 1 - (oc.encode_image(images, normalize=True) * ours.encode_image(images, normalize=True)).sum(-1),
            "text_prompts": 1 - (oc.encode_text(tok_short, normalize=True)
                                 * ours.encode_text(tok_short, normalize=True)).sum(-1),
            "text_full_context": 1 - (oc.encode_text(tok_long, normalize=True)
                                      * ours.encode_text(tok_long, normalize=True)).sum(-1),
        }
        results["max_cosine_distance"] = {k: float(v.abs().max()) for k, v in cos.items()}
        if args.runtimes:  # each runtime against clipper fp32
            results["max_cosine_distance_to_clipper_fp32"] = {name: {
                what: float((1 - (enc_of(m, what)(data) * enc_of(ours, what)(data)).sum(-1)).abs().max())
                for what, data in (("image", images), ("text_prompts", tok_short), ("text_full_context", tok_long))}
                for name, m in encoders.items() if name not in ("open_clip", "clipper")}
        for what, data in [("images", images), ("texts_prompts", tok_short), ("texts_full_context", tok_long)]:
            rates = interleaved_rates({name: lambda m=m, what=what, data=data: enc_of(m, what)(data)
                                       for name, m in encoders.items()},
                                      items_per_call=args.batch, repeats=args.repeats)
            results[what] = {name: round(r["per_s_median"], 2) for name, r in rates.items()}
            base = rates["open_clip"]["per_s_median"]
            results[what]["ratio"] = round(rates["clipper"]["per_s_median"] / base, 3)
            results[what]["ratio_to_open_clip"] = {name: round(r["per_s_median"] / base, 3) for name, r in rates.items()}
            if "transformers" in rates:
                results[what]["ratio_to_transformers"] = round(
                    rates["clipper"]["per_s_median"] / rates["transformers"]["per_s_median"], 3)
            print(f"{what:20s} " + "  ".join(f"{name} {rate:8.2f}/s" for name, rate in results[what].items()
                                              if name in encoders), flush=True)
    print("max cosine distance:", results["max_cosine_distance"])
    print("wrote", write_results("embed_model" + ("" if args.model == "ViT-B-32" else f"_{args.model}"), results))


def _texts(name: str, config, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of n distinct prompts and of n distinct texts filling the context."""
    t = config.text
    if t.tokenizer:  # random ids: short rows padded with 0, and full rows
        g = torch.Generator().manual_seed(0)
        short = torch.zeros(n, t.context_length, dtype=torch.long)
        short[:, :12] = torch.randint(1, t.vocab_size, (n, 12), generator=g)
        return short, torch.randint(1, t.vocab_size, (n, t.context_length), generator=g)
    # Every text distinct: clipper encodes repeated texts once, which would flatter it here.
    prompts = [f"a photo of a {LABELS[i % len(LABELS)]}, number {i}." for i in range(n)]
    long_texts = [f"{i} " + " ".join(["word"] * 100) for i in range(n)]
    tokenize = open_clip.get_tokenizer(name)
    return tokenize(prompts), tokenize(long_texts)


def enc_of(model, what: str):
    """The normalised encoder of `model` for images or texts."""
    fn = model.encode_image if what.startswith("image") else model.encode_text
    return lambda data: fn(data, normalize=True)


class _HF:
    """transformers' model behind open_clip's encode_image / encode_text."""

    def __init__(self, model):
        self.model = model

    @staticmethod
    def _out(out, normalize: bool):
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images, normalize=False):
        return self._out(self.model.get_image_features(pixel_values=images), normalize)

    def encode_text(self, ids, normalize=False):
        return self._out(self.model.get_text_features(input_ids=ids), normalize)


def _transformers(ours, tmp: Path, results: dict):
    import transformers

    from clipper.interop.hf import hf_config, save_hf_dir

    save_hf_dir(ours, tmp / "hf")
    cls = getattr(transformers, hf_config(ours)["architectures"][0])
    results["transformers"] = transformers.__version__
    return _HF(cls.from_pretrained(tmp / "hf", attn_implementation="sdpa").eval())


def _runtimes(ours, tmp: Path, args, results: dict) -> dict:
    """clipper int8 and bf16, and its ONNX export (fp32, int8) on ONNX Runtime, for `ours`."""
    from clipper.factory import load
    from clipper.interop.onnx_export import export_onnx
    from clipper.precision import native_bf16, with_precision

    ours.save(tmp / "model")
    out = {"clipper_int8": with_precision(load(tmp / "model"), "int8")}
    results["native_bf16"] = native_bf16("cpu")
    if results["native_bf16"] or args.force_bf16:
        out["clipper_bf16" + ("" if results["native_bf16"] else "_emulated")] = with_precision(load(tmp / "model"),
                                                                                              "bf16")
    for quantize in (None, "int8"):
        t0 = time.perf_counter()
        export_onnx(ours, tmp / f"onnx_{quantize or 'fp32'}", quantize=quantize)
        results[f"export_s_onnx_{quantize or 'fp32'}"] = round(time.perf_counter() - t0, 1)
        out[f"onnxruntime_{quantize or 'fp32'}"] = load(tmp / f"onnx_{quantize or 'fp32'}",
                                                        precision=quantize or "fp32")
    return out


if __name__ == "__main__":
    main()
