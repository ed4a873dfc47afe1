"""Image inputs for embedding: a file, a folder (recursive), a list file, or webdataset shards, as
one ordered list of items that any process can read by position (the order is deterministic)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError, MissingFileError
from ..io import read_text
from .reader import IMAGE_EXTS as SHARD_IMAGE_EXTS
from .reader import list_shards
from .items import ImageItem, InputSkip
from .remote import local_shard, looks_like_url
from .tar import TarDamage, tar_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
# Files a folder of images commonly holds beside them: not reported as skipped.
SIDECAR_SUFFIXES = {".txt", ".json"}


def list_images(spec: str | os.PathLike, allow_pipe: bool | None = None) -> tuple[list[ImageItem], list[InputSkip]]:
    """Items in a fixed order, plus what was passed over (files without an image extension, damaged
    shards), for the record.

    `spec` is an image file; a folder (searched recursively; captions from same-named .txt files);
    a list file (.txt/.lst/.list: one path per line, relative to the list's folder, optionally a
    tab and a caption); or shards (a .tar, a folder holding .tar files, a brace pattern or glob,
    shard URLs: see `list_shards`, which `allow_pipe` is passed to). The names found in folders,
    list files and globs are files, always (see `remote`).
    """
    text = str(spec)
    path = Path(text)
    if looks_like_url(text):
        return _shard_items(text, allow_pipe)
    if path.is_dir():
        if any(path.glob("*.tar")):  # a shard folder (its grid.png preview is not a sample)
            return _shard_items(text)
        return _folder_items(path)
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return _list_file_items(path), []
        if path.suffix.lower() == ".tar":
            return _shard_items(text)
        return [ImageItem(str(path), str(path))], []
    if any(c in text for c in "{*?["):
        return _shard_items(text)
    raise MissingFileError(f"{text}: no such file or folder")


def _caption_beside(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return txt.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _folder_items(root: Path) -> tuple[list[ImageItem], list[InputSkip]]:
    items, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            items.append(ImageItem(str(path), str(path), caption=_caption_beside(path)))
        elif suffix not in SIDECAR_SUFFIXES:
            skipped.append(InputSkip(str(path), "not an image file (extension)"))
    if not items:
        raise DataError(f"{root}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items, skipped


def _list_file_items(list_file: Path) -> list[ImageItem]:
    lines = read_text(list_file, "list file").splitlines()
    items = []
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        name, _, caption = line.partition("\t")
        path = Path(name.strip())
        path = path if path.is_absolute() else list_file.parent / path
        items.append(ImageItem(str(path), str(path), caption=caption.strip() or None))
    if not items:
        raise DataError(f"{list_file}: list file names no images")
    return items


def _shard_items(spec: str, allow_pipe: bool | None = None) -> tuple[list[ImageItem], list[InputSkip]]:
    """The image member of every sample in the shards, located by offset (read without untarring);
    a damaged shard gives the samples before the damage, and a skip that says where it broke."""
    items, skipped = [], []
    for shard in list_shards(spec, allow_pipe):
        try:
            members, damage = tar_index(shard)
        except (TarDamage, OSError) as e:
            members, damage = [], e
        if damage is not None:
            skipped.append(InputSkip(shard, f"damaged tar shard after {len(members)} member(s): {damage}"))
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            key, _, ext = name.split("/")[-1].partition(".")
            samples.setdefault(key, {})[ext.lower()] = (offset, size)
        if not members:
            continue
        with open(local_shard(shard), "rb") as f:
            for key, sample in samples.items():
                caption = None
                if "txt" in sample:
                    f.seek(sample["txt"][0])
                    caption = f.read(sample["txt"][1]).decode("utf-8", "replace").strip()
                ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
                # no image member: an item that reads as empty, so that the sample is listed as skipped
                offset, size = sample[ext] if ext else (0, 0)
                items.append(ImageItem(f"{Path(shard).name}/{key}", shard, offset, size, caption))
    return items, skipped
