"""The fixed protocol on the real sets (docs/protocol.md, "Data"). Runs where the Debian packages are
installed or fetchable (scripts/test.sh fetches them); skipped with the reason elsewhere."""

import numpy as np
import pytest

from clipper.data import emoji, fashion_mnist
from clipper.data.debian import PackageError


def _or_skip(fn, *args):
    try:
        return fn(*args)
    except PackageError as e:
        pytest.skip(f"Debian data package unavailable: {e}")


def test_fashion_mnist_protocol():
    train_x, train_y = _or_skip(fashion_mnist.load_split, "train")
    test_x, test_y = fashion_mnist.load_split("test")
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
    assert fashion_mnist.CLASSES == ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt",
                                     "sneaker", "bag", "ankle boot"]
    assert not set(fashion_mnist.TRAIN_TEMPLATES) & set(fashion_mnist.EVAL_TEMPLATES)


def test_emoji_protocol():
    font_path, cldr = _or_skip(emoji.find_files)
    font = emoji.EmojiFont(font_path)
    pairs = emoji.pairs(font, cldr)
    splits = [p.split for p in pairs]
    # Debian 12: fonts-noto-color-emoji 2.042, unicode-cldr-core 41
    assert (len(pairs), splits.count("train"), splits.count("test")) == (3635, 2887, 748)
    assert len({p.key for p in pairs}) == len(pairs)
    by_cp = {p.cp: p for p in pairs}
    balloon = by_cp["🎈"]
    assert balloon.name == "balloon" and "celebration" in balloon.keywords and balloon.split == "train"
    image = font.render(by_cp["👩🏽‍🍳"].text)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[0, 0] == 255).all() and pixels.std() > 20  # white margin, a real glyph inside
