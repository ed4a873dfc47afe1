"""Webdataset shards in the img2dataset layout: per sample `KEY.jpg|png`, `KEY.txt`, `KEY.json`.

Deterministic: members carry fixed metadata (mtime 0, root owner, mode 644), so the same samples
give byte-identical shards. A set is written to a staging folder and moved into place when complete:
an interrupted or failed write leaves the previous set as it was.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError, DataError
from ..progress import track
from .samples import Rejected, Sample

SIZES_FILE, STATS_FILE, REJECTED_FILE, GRID_FILE = "sizes.json", "stats.json", "rejected.jsonl", "grid.png"
# a labelled set's class names (one per line, in label order) and its zero-shot prompt templates
CLASSNAMES_FILE, TEMPLATES_FILE = "classnames.txt", "templates.txt"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def reason_kind(reason: str) -> str:
    """'dir/x.jpg: not a readable image (cannot identify ...)' -> 'not a readable image'."""
    return reason.split(": ", 1)[-1].split(" (")[0]


def write_shards(items: Iterable[Sample | Rejected], out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 grid_size: int = 32, total: int | None = None, desc: str = "shards",
                 classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> dict:
    """Write `items` as shards 00000.tar, 00001.tar, ... in `out_dir`, with sizes.json (samples per
    shard), stats.json (counts, rejected inputs by reason), rejected.jsonl and grid.png; for a
    labelled set (samples' json 'label' indexes `classnames`) also classnames.txt and, when given,
    templates.txt, which zero-shot evaluation reads."""
    if samples_per_shard <= 0:
        raise ConfigError(f"samples_per_shard: must be positive, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".partial-*"):  # left by a writer that was killed
        shutil.rmtree(partial, ignore_errors=True)
    # Everything is written to a staging folder first: the old set stays whole until the new one is.
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        stats = _write_set(items, stage, samples_per_shard, grid_size, total, desc)
        for name, lines in ((CLASSNAMES_FILE, classnames), (TEMPLATES_FILE, templates)):
            if lines is not None:
                (stage / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        new = sorted(stage.iterdir(), key=lambda p: p.suffix != ".tar")  # shards first, then what describes them
        for path in new:
            os.replace(path, out / path.name)
        names = {path.name for path in new}
        for stale in [*out.glob("*.tar"), out / SIZES_FILE, out / STATS_FILE, out / REJECTED_FILE, out / GRID_FILE,
                      out / CLASSNAMES_FILE, out / TEMPLATES_FILE]:
            if stale.name not in names:  # a rewrite with fewer shards must not leave old ones behind
                stale.unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return stats


def _write_set(items: Iterable[Sample | Rejected], out: Path, samples_per_shard: int, grid_size: int,
               total: int | None, desc: str) -> dict:
    sizes: dict[str, int] = {}
    rejected: list[Rejected] = []
    keys: set[str] = set()
    grid: list[Sample] = []
    shard: list[Sample] = []

    def flush() -> None:
        name = f"{len(sizes):05d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in shard:
                data, ext = s.image_bytes()
                add_member(tar, f"{s.key}.{ext}", data)
                add_member(tar, f"{s.key}.txt", s.text.encode("utf-8"))
                add_member(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True, ensure_ascii=False).encode())
        sizes[name] = len(shard)
        shard.clear()

    for item in track(items, total, desc, "sample"):
        if isinstance(item, Rejected):
            rejected.append(item)
            continue
        if "." in item.key or "/" in item.key or item.key in keys:
            raise DataError(f"sample key {item.key!r}: duplicate, or contains '.' or '/'")
        keys.add(item.key)
        if len(grid) < grid_size:
            grid.append(item)
        shard.append(item)
        if len(shard) == samples_per_shard:
            flush()
    if shard:
        flush()
    if not sizes:
        raise DataError(f"{out}: no sample was written ({len(rejected)} rejected)")

    stats = {"samples": sum(sizes.values()), "shards": len(sizes), "rejected": len(rejected),
             "rejected_by_reason": dict(sorted(Counter(reason_kind(r.reason) for r in rejected).items()))}
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1) + "\n")
    (out / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    (out / REJECTED_FILE).write_text("".join(json.dumps({"source_id": r.source_id, "reason": r.reason},
                                                        ensure_ascii=False) + "\n" for r in rejected))
    if grid:
        write_grid(grid, out / GRID_FILE)
    return stats


def class_index(meta: object, position: dict[str, int]) -> int | None:
    """A labelled sample's class: its json 'label' (an index) or 'class' (a name in `position`)."""
    if not isinstance(meta, dict):
        return None
    label = meta.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(position):
        return label
    return position.get(meta["class"]) if isinstance(meta.get("class"), str) else None


def read_set_lines(data: str, name: str) -> list[str] | None:
    """The lines of `name` (CLASSNAMES_FILE, TEMPLATES_FILE) written beside a shard set (`data`
    its folder, or a pattern or file inside one), or None when there is none."""
    folder = Path(data)
    if not folder.is_dir():
        folder = folder.parent
    path = folder / name
    if not path.is_file():
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable as UTF-8 text ({e})") from None
    if len(set(lines)) != len(lines):
        raise DataError(f"{path}: a line appears twice")
    return lines or None


def write_grid(samples: list[Sample], path: str | os.PathLike, cell: int = 96, columns: int = 8) -> None:
    """A contact sheet: each image scaled to `cell` px with its caption below, for a quick look."""
    font = ImageFont.load_default()
    rows = (len(samples) + columns - 1) // columns
    text_h = 36
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        data, _ = s.image_bytes()
        im = Image.open(io.BytesIO(data)).convert("RGB")
        scale = cell / max(im.size)  # small images (28 px) are enlarged without blur
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        lines = textwrap.wrap(s.text, width=cell // 6)[:3]
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", font=font, spacing=0)
    sheet.save(path)
