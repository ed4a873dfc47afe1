"""The row-chunk budget of CPU inference (clipper.chunks): ViT-B-32, batch 64, 2 threads,
images and full-context texts per second and page faults per batch, at each budget in MiB, for
fp32, int8 and bf16 (bf16 where native), all in the same interleaved rounds. A budget of 0 runs
the batch whole (no chunks).

    python benchmarks/row_chunks.py [--budgets 0,8,16,24,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from clipper.presets import preset  # noqa: E402
from clipper.interop.open_clip import from_open_clip_state_dict  # noqa: E402
from clipper.model import chunks  # noqa: E402
from clipper.precision import native_bf16  # noqa: E402
from clipper.quantize import with_precision  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0,8,16,24,32", help="MiB, comma-separated; 0 = no chunks")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    ours = from_open_clip_state_dict(oc.state_dict(), preset("ViT-B-32")).eval()
    precisions = ["fp32", "int8"] + (["bf16"] if native_bf16("cpu") else [])
    models = {p: with_precision(copy.deepcopy(ours), p) for p in precisions}
    images = torch.randn(args.batch, 3, 224, 224)
    texts = open_clip.get_tokenizer("ViT-B-32")([f"{i} " + " ".join(["word"] * 100) for i in range(args.batch)])
    budgets = [int(b) for b in args.budgets.split(",")]
    results = {"batch": args.batch, "budgets_mib": budgets, "default_mib": chunks.ROW_CHUNK_BYTES >> 20}
    with torch.inference_mode():
        for what, data in (("images", images), ("texts_full_context", texts)):
            runs = {(p, b): (models[p].encode_image if what == "images" else models[p].encode_text)
                    for p in precisions for b in budgets}
            seconds = {k: [] for k in runs}
            faults = {k: [] for k in runs}
            for round_ in range(args.repeats + 1):  # the first round warms up (and measures each row once)
                for (p, b), fn in runs.items():
                    chunks.ROW_CHUNK_BYTES = (b << 20) if b else 1 << 62
                    r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                    fn(data)
                    if round_:
                        seconds[(p, b)].append(time.perf_counter() - t0)
                        faults[(p, b)].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
            results[what] = {p: {str(b): {"per_s": round(args.batch / statistics.median(seconds[(p, b)]), 2),
                                          "page_faults": int(statistics.median(faults[(p, b)]))}
                                 for b in budgets} for p in precisions}
            for p in precisions:
                print(f"{what:18s} {p}: " + "  ".join(f"{b} MiB {v['per_s']:7.2f}/s ({v['page_faults']} faults)"
                                                      for b, v in results[what][p].items()), flush=True)
    print("wrote", write_results("row_chunks", results))


if __name__ == "__main__":
    main()
