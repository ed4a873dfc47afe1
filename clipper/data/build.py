"""Real data sets -> shard folders, one per split (`OUT/train`, `OUT/test`)."""

from __future__ import annotations

import os
from pathlib import Path

from . import emoji, fashion_mnist
from .shards import write_shards


def build_fashion_mnist(out: str | os.PathLike, root: str | os.PathLike | None = None, seed: int = 0,
                        samples_per_shard: int = 5000) -> dict[str, dict]:
    return {split: write_shards(fashion_mnist.samples(split, root, seed), Path(out) / split, samples_per_shard,
                                total=fashion_mnist.COUNTS[split], desc=f"fashion-mnist {split}",
                                classnames=fashion_mnist.CLASSES, templates=fashion_mnist.EVAL_TEMPLATES)
            for split in ("train", "test")}


def build_emoji(out: str | os.PathLike, font: str | os.PathLike | None = None,
                cldr_root: str | os.PathLike | None = None, samples_per_shard: int = 500,
                styles: tuple[str, ...] = ("noto",)) -> dict[str, dict]:
    """train (training styles only), val (evaluation-only styles' renderings of the training
    emoji) and test (every style) as there are styles for them."""
    splits = [*(["train"] if set(styles) & set(emoji.TRAIN_STYLES) else []),
              *(["val"] if set(styles) - set(emoji.TRAIN_STYLES) else []), "test"]
    return {split: write_shards(emoji.samples(split, font, cldr_root, styles=styles), Path(out) / split,
                                samples_per_shard, desc=f"emoji {split}")
            for split in splits}
