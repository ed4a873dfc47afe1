"""Fashion-MNIST (docs/protocol.md, "Data"): the idx files of Debian's `dataset-fashion-mnist`, a folder
the user names, or the upstream files."""

from __future__ import annotations

import gzip
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .debian import package_file
from ..errors import ConfigError, DataError, MissingFileError
from .instructions import conversation
from .samples import Sample

CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TRAIN_TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of the {}.",
                   "a picture of a {}, an item of clothing.", "a photo of the {}.", "a close-up photo of a {}.",
                   "a grayscale image of a {}.", "a cropped photo of the {}.", "a small photo of a {}.", "a {}."]
EVAL_TEMPLATES = ["itap of a {}.", "a photo of the large {}.", "art of the {}.", "a bad photo of the {}.",
                  "a photo of the small {}.", "a good photo of a {}.", "a rendering of a {}.",
                  "a pixelated photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}."]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
COUNTS = {"train": 60_000, "test": 10_000}
PACKAGE, PACKAGE_DIR = "dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"
UPSTREAM = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four idx files: `root` if given, else Debian's package (fetched if needed)."""
    if root is not None:
        root = Path(root)
        missing = [f for pair in FILES.values() for f in pair if not (root / f).is_file()]
        if missing:
            raise MissingFileError(f"{root}: missing Fashion-MNIST file(s) {', '.join(missing)}")
        return root
    return package_file(PACKAGE, f"{PACKAGE_DIR}/{FILES['train'][0]}").parent


def download_upstream(dest: str | os.PathLike) -> Path:
    """Fetch the four upstream files into `dest` (needs a network; Debian's package needs none)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (f for pair in FILES.values() for f in pair):
        if not (dest / name).is_file():
            tmp = dest / (name + ".part")
            urllib.request.urlretrieve(UPSTREAM + name, tmp)
            tmp.rename(dest / name)
    return dest


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: [N] labels or [N, rows, cols] images."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape}, file holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of 'train' or 'test'."""
    if split not in FILES:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(FILES)}")
    folder = find_root(root)
    images, labels = (read_idx(folder / f) for f in FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels.astype(np.int64)


def samples(split: str, root: str | os.PathLike | None = None, seed: int = 0) -> Iterator[Sample]:
    """Training images get a TRAIN template drawn at random (seeded) and the question what garment
    they show (clipper.data.instructions); test images their class name."""
    images, labels = load_split(split, root)
    template_ids = np.random.default_rng(seed).integers(0, len(TRAIN_TEMPLATES), size=len(labels))
    for i, (image, label) in enumerate(zip(images, labels)):
        name = CLASSES[label]
        meta = {"label": int(label), "class": name, "split": split, "source_id": f"fashion-mnist/{split}/{i}"}
        if split == "train":
            text = TRAIN_TEMPLATES[template_ids[i]].format(name)
            meta["template"] = int(template_ids[i])
            meta["conversations"] = conversation({"garment": name}, meta["source_id"])
        else:
            text = name
        yield Sample(key=f"{split}-{i:05d}", image=image, text=text, meta=meta)
