"""Generic sources: a folder of images with same-named .txt captions, and a CSV/TSV of
(image path, caption). Keys are sequential indices in sorted order, as img2dataset writes them;
the original path is kept as the sample's source id. Either can be labelled (folder names, or a
CSV column): each sample's json then holds its `class` and `label` (the class's index in the sorted
class names), which zero-shot evaluation reads."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class Labelled:
    """The samples of a source, and its class names (None: unlabelled) in label order."""
    samples: Iterator[Sample | Rejected]
    classnames: list[str] | None = None

    def __iter__(self) -> Iterator[Sample | Rejected]:
        return iter(self.samples)


def _sample(index: int, image_path: Path, caption: str, source_id: str, max_pixels: int,
            label: tuple[int, str] | None = None) -> Sample | Rejected:
    try:
        data, ext = image_file_bytes(image_path, max_pixels)
    except ImageError as e:
        return Rejected(source_id, str(e))
    meta = {"source_id": source_id, **({"label": label[0], "class": label[1]} if label else {})}
    return Sample(key=f"{index:09d}", image=data, ext=ext, text=caption, meta=meta)


def folder_class(rel: str) -> str | None:
    """The class of an image at `rel` (relative to the root) in a labelled folder: its top folder,
    with underscores as spaces (`golden_retriever/1.jpg` -> 'golden retriever'), as prompts read it."""
    top, sep, _ = rel.partition("/")
    return class_name(top.replace("_", " ")) if sep else None


def class_name(text: str) -> str | None:
    """A class name as classnames.txt holds it: one line, its whitespace runs single spaces."""
    return " ".join(text.split()) or None


def folder_samples(root: str | os.PathLike, max_pixels: int = MAX_PIXELS, classes: bool = False) -> Labelled:
    """Every image under `root` (recursive, sorted) with the caption in the .txt beside it. With
    `classes`, the top folder is the image's class (ImageFolder's layout), and an image without a
    .txt has its class name as caption. A missing or image-less folder fails here, before any
    sample is read."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise MissingFileError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    names = sorted({c for p in images if (c := folder_class(p.relative_to(root).as_posix()))}) if classes else None
    if classes and not names:
        raise DataError(f"{root}: no class folders (labelled by folder: ROOT/CLASS/image.jpg)")
    return Labelled(_folder_items(root, images, max_pixels, names), names)


def _folder_items(root: Path, images: list[Path], max_pixels: int,
                  classnames: list[str] | None) -> Iterator[Sample | Rejected]:
    position = {name: i for i, name in enumerate(classnames or ())}
    for index, path in enumerate(images):
        rel = path.relative_to(root).as_posix()
        label = None
        if classnames is not None:
            name = folder_class(rel)
            if name is None:
                yield Rejected(rel, f"{rel}: not in a class folder")
                continue
            label = (position[name], name)
        txt = path.with_suffix(".txt")
        if not txt.is_file() and label is None:
            yield Rejected(rel, f"{rel}: no caption file {txt.name}")
            continue
        try:
            caption = read_caption(txt.read_bytes(), txt.relative_to(root).as_posix()) if txt.is_file() else label[1]
        except ValueError as e:
            yield Rejected(rel, str(e))
            continue
        yield _sample(index, path, caption, rel, max_pixels, label)


def csv_samples(path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption",
                max_pixels: int = MAX_PIXELS, label_column: str | None = None) -> Labelled:
    """Rows of a CSV (or .tsv) file; image paths are relative to the file's folder; with
    `label_column`, that column names each row's class. A missing file or column fails here,
    before any sample is read."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            columns = next(csv.reader(f, delimiter=delimiter), [])
            # the class names first: a label is an index into all of them, sorted
            names = sorted({class_name(row.get(label_column) or "") for row in csv.DictReader(f, columns, delimiter=delimiter)}
                           - {None}) if label_column in columns else None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    for column in (image_column, caption_column, *([label_column] if label_column else [])):
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
    if label_column and not names:
        raise DataError(f"{path}: column {label_column!r} names no class")
    return Labelled(_csv_items(path, delimiter, image_column, caption_column, max_pixels, label_column, names), names)


def _csv_items(path: Path, delimiter: str, image_column: str, caption_column: str, max_pixels: int,
               label_column: str | None, classnames: list[str] | None) -> Iterator[Sample | Rejected]:
    position = {name: i for i, name in enumerate(classnames or ())}
    with open(path, newline="", encoding="utf-8") as f:
        for index, row in enumerate(csv.DictReader(f, delimiter=delimiter)):
            where = f"{path.name}:{index + 2}"  # line number, counting the header
            image = (row.get(image_column) or "").strip()
            if not image:
                yield Rejected(where, f"{where}: empty image path")
                continue
            label = None
            if label_column:
                name = class_name(row.get(label_column) or "")
                if not name:
                    yield Rejected(where, f"{where}: empty {label_column}")
                    continue
                label = (position[name], name)
            try:
                caption = read_caption((row.get(caption_column) or "").encode("utf-8"), where)
            except ValueError as e:
                yield Rejected(where, str(e))
                continue
            yield _sample(index, path.parent / image, caption, image, max_pixels, label)


MAX_RECORD_BYTES = 1 << 20  # one conversation record (a JSONL line)


def llava_samples(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                  max_pixels: int = MAX_PIXELS) -> Labelled:
    """LLaVA's instruction data: a .json list or .jsonl of {"image": path, "conversations": [{"from":
    "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}; image paths are relative
    to `image_folder` (default: the file's folder) and must stay inside it. The caption is the first
    answer; the conversation is kept in the json (what `instructions` trains on)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    root = Path(image_folder) if image_folder else path.parent
    if not root.is_dir():
        raise MissingFileError(f"{root}: no such folder (the images' folder)")
    return Labelled(_llava_items(path, root.resolve(), max_pixels))


def _llava_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of each line of a .jsonl, or each entry of a .json list."""
    import json

    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                where = f"{path.name}:{number}"
                if len(line) > MAX_RECORD_BYTES:
                    yield where, None
                elif line.strip():
                    try:
                        yield where, json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                        yield where, None
        return
    try:
        records = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not a JSON list of conversations ({str(e)[:80]})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: not a JSON list of conversations")
    yield from ((f"{path.name}[{i}]", r) for i, r in enumerate(records))


def _llava_items(path: Path, root: Path, max_pixels: int) -> Iterator[Sample | Rejected]:
    from .instructions import question_answers

    for index, (where, record) in enumerate(_llava_records(path)):
        if not isinstance(record, dict):
            yield Rejected(where, f"{where}: not a JSON object with image and conversations")
            continue
        image, conversation = record.get("image"), record.get("conversations")
        turns = question_answers(conversation)
        if not isinstance(image, str) or not image.strip():
            yield Rejected(where, f"{where}: no image path (text-only conversations are not image pairs)")
            continue
        if not turns:
            yield Rejected(where, f"{where}: conversations are not LLaVA's human/gpt turns")
            continue
        target = (root / image).resolve()
        if not target.is_relative_to(root):
            yield Rejected(where, f"{where}: image {image[:80]!r} is outside the images' folder")
            continue
        sample = _sample(index, target, turns[0][1], image, max_pixels)
        if isinstance(sample, Sample):
            sample.meta["conversations"] = conversation
        yield sample