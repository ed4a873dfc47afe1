"""Generic sources: a folder of images with same-named .txt captions, and a CSV/TSV of
(image path, caption). Keys are sequential indices in sorted order, as img2dataset writes them;
the original path is kept as the sample's source id."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from ..images import MAX_PIXELS, image_file_bytes
from ..errors import DataError, ImageError, MissingFileError
from .samples import Rejected, Sample

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_caption(raw: bytes, where: str) -> str:
    """A caption from bytes: UTF-8, stripped, non-empty; raises ValueError naming `where`."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}: caption is not UTF-8") from None
    if not text:
        raise DataError(f"{where}: empty caption")
    return text


def _sample(index: int, image_path: Path, caption: str, source_id: str, max_pixels: int) -> Sample | Rejected:
    try:
        data, ext = image_file_bytes(image_path, max_pixels)
    except ImageError as e:
        return Rejected(source_id, str(e))
    return Sample(key=f"{index:09d}", image=data, ext=ext, text=caption, meta={"source_id": source_id})


def folder_samples(root: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Iterator[Sample | Rejected]:
    """Every image under `root` (recursive, sorted) with the caption in the .txt beside it.
    A missing or image-less folder fails here, before any sample is read."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise MissingFileError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return _folder_items(root, images, max_pixels)


def _folder_items(root: Path, images: list[Path], max_pixels: int) -> Iterator[Sample | Rejected]:
    for index, path in enumerate(images):
        rel = path.relative_to(root).as_posix()
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            yield Rejected(rel, f"{rel}: no caption file {txt.name}")
            continue
        try:
            caption = read_caption(txt.read_bytes(), txt.relative_to(root).as_posix())
        except ValueError as e:
            yield Rejected(rel, str(e))
            continue
        yield _sample(index, path, caption, rel, max_pixels)


def csv_samples(path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption",
                max_pixels: int = MAX_PIXELS) -> Iterator[Sample | Rejected]:
    """Rows of a CSV (or .tsv) file; image paths are relative to the file's folder. A missing
    file or column fails here, before any sample is read."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f, delimiter=delimiter), [])
    for column in (image_column, caption_column):
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
    return _csv_items(path, delimiter, image_column, caption_column, max_pixels)


def _csv_items(path: Path, delimiter: str, image_column: str, caption_column: str,
               max_pixels: int) -> Iterator[Sample | Rejected]:
    with open(path, newline="", encoding="utf-8") as f:
        for index, row in enumerate(csv.DictReader(f, delimiter=delimiter)):
            where = f"{path.name}:{index + 2}"  # line number, counting the header
            image = (row.get(image_column) or "").strip()
            if not image:
                yield Rejected(where, f"{where}: empty image path")
                continue
            try:
                caption = read_caption((row.get(caption_column) or "").encode("utf-8"), where)
            except ValueError as e:
                yield Rejected(where, str(e))
                continue
            yield _sample(index, path.parent / image, caption, image, max_pixels)
