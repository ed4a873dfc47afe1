"""A clipper shard set -> clip_benchmark's webdataset layout, so that the independent evaluator
(`clip_benchmark eval --dataset wds/NAME --dataset_root DIR`) runs on a user's own data:

    DIR/SPLIT/0.tar, 1.tar, ...   KEY.png|jpg|webp with KEY.cls (the label) or KEY.txt (captions)
    DIR/SPLIT/nshards.txt
    DIR/classnames.txt, DIR/zeroshot_classification_templates.txt   (classification; {c} templates)
    DIR/dataset_type.txt                                            (retrieval)

A set with class names (classnames.txt) exports for classification (a sample without a label is
skipped and counted), any other for retrieval. Images keep their bytes. Written to a staging folder and renamed into
place: an interrupted export leaves no half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..progress import track
from ..prompts import DEFAULT_TEMPLATES, check_templates
from .reader import IMAGE_EXTS, list_shards, read_tar, shard_sizes
from .shards import CLASSNAMES_FILE, TEMPLATES_FILE, add_member, class_index, read_set_lines


def export_clip_benchmark(data: str, out: str | os.PathLike, split: str = "test",
                          templates: Sequence[str] | None = None, samples_per_shard: int = 1000) -> dict:
    """Export the shards `data` to `out` (replaced); returns counts and the task type."""
    shards = list_shards(data)
    classnames = read_set_lines(data, CLASSNAMES_FILE)
    templates = check_templates(list(templates or read_set_lines(data, TEMPLATES_FILE) or DEFAULT_TEMPLATES),
                                "templates")
    kind = "classification" if classnames else "retrieval"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (stage / split).mkdir()
        counts = _write_split(shards, stage / split, classnames, samples_per_shard)
        if classnames:
            (stage / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
            # clip_benchmark fills a named field: "a photo of a {c}."
            (stage / "zeroshot_classification_templates.txt").write_text(
                "".join(t.replace("{}", "{c}") + "\n" for t in templates), encoding="utf-8")
        else:
            (stage / "dataset_type.txt").write_text("retrieval\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"type": kind, **counts}


def _write_split(shards: list[str], out: Path, classnames: list[str] | None, samples_per_shard: int) -> dict:
    written, skipped, tar = 0, 0, None
    position = None if classnames is None else {name: i for i, name in enumerate(classnames)}
    try:
        for sample in track((s for shard in shards for s in read_tar(shard)), sum(shard_sizes(shards)),
                            "clip_benchmark", "sample"):
            image_ext = next((e for e in IMAGE_EXTS if isinstance(sample, dict) and e in sample), None)
            target = None if image_ext is None else _target(sample, position)
            if target is None:  # damaged, no image, or no label / caption: as the evaluators would skip it
                skipped += 1
                continue
            if written % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(out / f"{written // samples_per_shard}.tar", "w", format=tarfile.USTAR_FORMAT)
            key = sample["__key__"]
            add_member(tar, f"{key}.{image_ext}", sample[image_ext])
            add_member(tar, f"{key}.{'cls' if classnames else 'txt'}", target)
            written += 1
    finally:
        if tar is not None:
            tar.close()
    if not written:
        raise DataError(f"{shards[0]}: no sample to export ({skipped} skipped)"
                        + ("; every sample needs json 'label' or 'class'" if classnames else ""))
    (out / "nshards.txt").write_text(f"{(written + samples_per_shard - 1) // samples_per_shard}\n")
    return {"samples": written, "skipped": skipped}


def _target(sample: dict, position: dict[str, int] | None) -> bytes | None:
    """The .cls (label index, `position` maps class names to them) or .txt (caption; `position`
    None) member's bytes, or None when the sample has none."""
    if position is None:
        return sample.get("txt") or None
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    label = class_index(meta, position)
    return None if label is None else str(label).encode()
