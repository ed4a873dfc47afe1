"""Where emoji retrieval fails: text->image R@1 on the test split, split by whether the query name
holds a word that no training name or keyword list contains (such a name cannot be composed from
what was learned).

    python benchmarks/emoji_unseen_words.py --model runs/bench-emoji-small-.../model
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import ensure_shards  # noqa: E402

import clipper  # noqa: E402
from clipper.data import emoji  # noqa: E402
from clipper.data.pipeline import ShardDataset, make_loader  # noqa: E402


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    model = clipper.load(args.model)
    font, cldr = emoji.find_files()
    seen: set[str] = set()
    for pair in emoji.pairs(emoji.EmojiFont(font), cldr):
        if pair.split == "train":
            seen |= words(pair.name) | words(" ".join(pair.keywords))
    data = ShardDataset(ensure_shards("emoji") / "test", model.config, 500, train=False, rank=0, world=1)
    images, texts, names = [], [], []
    with torch.inference_mode():
        for batch in make_loader(data, 0):
            if batch["key"]:
                images.append(model.encode_image(batch["image"], normalize=True))
                texts.append(model.encode_text(batch["text"], normalize=True))
                names += [m["name"] for m in batch["meta"]]
    sim = torch.cat(texts) @ torch.cat(images).T
    hit = (sim > sim.diagonal()[:, None]).sum(1) == 0  # as evaluate.recall_at_k
    unseen = torch.tensor([bool(words(n) - seen) for n in names])
    result = {"model": args.model, "test": len(names), "t2i_R@1": round(100 * hit.float().mean().item(), 2),
              "unseen_word_names": int(unseen.sum()), "t2i_R@1_unseen": round(100 * hit[unseen].float().mean().item(), 2),
              "seen_word_names": int((~unseen).sum()), "t2i_R@1_seen": round(100 * hit[~unseen].float().mean().item(), 2),
              "examples_unseen": [n for n, u in zip(names, unseen.tolist()) if u][:10]}
    print(result)
    print("wrote", write_results("emoji_unseen_words", result))


if __name__ == "__main__":
    main()
