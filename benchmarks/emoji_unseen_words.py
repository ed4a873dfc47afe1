"""Where emoji retrieval fails: text->image R@1, split by whether the query name holds a word that
no name or keyword list of the training shards contains (such a name cannot be composed from what
the pairs taught). Any model (its own tokenizer); the test split by default, or a validation split.

    python benchmarks/emoji_unseen_words.py --model runs/bench-emoji-small-.../model \
        [--train data/shards/emoji-styles/train --eval data/shards/emoji/test --style noto]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import ensure_shards  # noqa: E402

import clipper  # noqa: E402
from clipper.data.pipeline import ShardDataset, make_loader  # noqa: E402
from clipper.data.reader import Skip, list_shards, read_tar  # noqa: E402
from clipper.evaluate import only_style  # noqa: E402


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def trained_words(train: str) -> set[str]:
    """The words of every name and keyword list (json) in the training shards."""
    seen: set[str] = set()
    for shard in list_shards(train):
        for sample in read_tar(shard):
            if not isinstance(sample, Skip) and "json" in sample:
                meta = json.loads(sample["json"])
                seen |= words(meta.get("name", "")) | words(" ".join(meta.get("keywords", [])))
    return seen


def unseen_word_split(model: clipper.CLIP, train: str, evaluation: str, style: str | None = "noto") -> dict:
    """t2i R@1 over the eval shards' `style` samples (as evaluate's retrieval), overall and for the
    names with / without a word the training shards never hold."""
    seen = trained_words(train)
    data = ShardDataset(evaluation, model.config, 500, train=False, rank=0, world=1)
    batches = make_loader(data, 0)
    images, texts, names = [], [], []
    with torch.inference_mode():
        for batch in (only_style(batches, style) if style else batches):
            if batch["key"]:
                images.append(model.encode_image(batch["image"], normalize=True))
                texts.append(model.encode_text(batch["text"], normalize=True))
                names += [m["name"] for m in batch["meta"]]
    sim = torch.cat(texts) @ torch.cat(images).T
    hit = (sim > sim.diagonal()[:, None]).sum(1) == 0  # as evaluate.recall_at_k
    unseen = torch.tensor([bool(words(n) - seen) for n in names])
    return {"eval": evaluation, "trained_on": train, "n": len(names), "t2i_R@1": round(100 * hit.float().mean().item(), 2),
            "unseen_word_names": int(unseen.sum()), "t2i_R@1_unseen": round(100 * hit[unseen].float().mean().item(), 2),
            "seen_word_names": int((~unseen).sum()), "t2i_R@1_seen": round(100 * hit[~unseen].float().mean().item(), 2),
            "examples_unseen": [n for n, u in zip(names, unseen.tolist()) if u][:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", help="the shards the model was trained on (default: the emoji-styles train split)")
    ap.add_argument("--eval", help="shards to score (default: the Noto emoji test split)")
    ap.add_argument("--style", default="noto", help="score this style's samples only ('' for all)")
    args = ap.parse_args()
    result = {"model": args.model, **unseen_word_split(
        clipper.load(args.model), args.train or str(ensure_shards("emoji-styles") / "train"),
        args.eval or str(ensure_shards("emoji") / "test"), args.style or None)}
    print(result)
    print("wrote", write_results("emoji_unseen_words", result))


if __name__ == "__main__":
    main()
