"""ViT-B-32 @ 224, batch 64, 2 threads: clipper vs open_clip on the same weights, in one run.

Images/s and texts/s for each and the ratios, plus the largest cosine distance between their
normalised outputs. Texts are distinct realistic prompts ("a photo of a {label}, number {i}.")
and, separately, distinct texts that fill the whole 77-token context (where truncation saves nothing).

    python benchmarks/embed_model.py [--model ViT-B-32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rates, write_results  # noqa: E402

from clipper.interop import from_open_clip_state_dict  # noqa: E402
from clipper.config import preset  # noqa: E402

LABELS = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
          "cat", "dog", "red apple", "golden retriever puppy", "mountain bike", "cup of coffee"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    oc = open_clip.create_model(args.model, pretrained=None).eval()
    ours = from_open_clip_state_dict(oc.state_dict(), preset(args.model)).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    # Every text distinct: clipper encodes repeated texts once, which would flatter it here.
    prompts = [f"a photo of a {LABELS[i % len(LABELS)]}, number {i}." for i in range(args.batch)]
    long_texts = [f"{i} " + " ".join(["word"] * 100) for i in range(args.batch)]
    tok_short, tok_long = open_clip.tokenize(prompts), open_clip.tokenize(long_texts)

    results = {"model": args.model, "batch": args.batch}
    with torch.inference_mode():
        cos = {
            "image": 1 - (oc.encode_image(images, normalize=True) * ours.encode_image(images, normalize=True)).sum(-1),
            "text_prompts": 1 - (oc.encode_text(tok_short, normalize=True)
                                 * ours.encode_text(tok_short, normalize=True)).sum(-1),
            "text_full_context": 1 - (oc.encode_text(tok_long, normalize=True)
                                      * ours.encode_text(tok_long, normalize=True)).sum(-1),
        }
        results["max_cosine_distance"] = {k: float(v.abs().max()) for k, v in cos.items()}
        for what, data, enc in [("images", images, "encode_image"), ("texts_prompts", tok_short, "encode_text"),
                                ("texts_full_context", tok_long, "encode_text")]:
            rates = interleaved_rates({"open_clip": lambda enc=enc, data=data: getattr(oc, enc)(data),
                                       "clipper": lambda enc=enc, data=data: getattr(ours, enc)(data)},
                                      items_per_call=args.batch, repeats=args.repeats)
            results[what] = {name: round(r["per_s_median"], 2) for name, r in rates.items()}
            results[what]["ratio"] = round(rates["clipper"]["per_s_median"] / rates["open_clip"]["per_s_median"], 3)
            print(f"{what:20s} open_clip {results[what]['open_clip']:8.2f}/s  clipper {results[what]['clipper']:8.2f}/s"
                  f"  ratio {results[what]['ratio']:.3f}", flush=True)
    print("max cosine distance:", results["max_cosine_distance"])
    print("wrote", write_results("embed_model", results))


if __name__ == "__main__":
    main()
