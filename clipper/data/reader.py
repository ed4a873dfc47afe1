"""Reading webdataset shards: listing them, their samples (members grouped by key), their sizes
and captions. Damaged archives end with a `Skip` naming where they broke, never an exception."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from ..errors import ClipperError, DataError, MissingFileError
from .shards import SIZES_FILE
from .sources import read_caption
from .remote import is_url, looks_like_url, typed
from .tar import TarDamage, tar_members

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Skip:
    shard: str
    key: str
    reason: str


def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], allow_pipe: bool | None = None) -> list[str]:
    """Shard paths from a folder (its *.tar), a brace pattern (`d/{00000..00009}.tar`), a glob, or a
    list; or shard URLs (`pipe:`, `http(s)://`, fsspec's: see `remote`), brace patterns too, fetched
    when read. `spec` is what the user typed: only it may be a URL (`pipe:` with `allow_pipe`, None:
    CLIPPER_ALLOW_PIPE); the names a folder or glob yields are files, whatever they look like."""
    try:
        return _list_shards(spec, allow_pipe)
    except ClipperError:
        raise
    except OSError as e:  # a name the file system refuses (too long, ...): the spec's error, not a traceback
        raise DataError(f"{str(spec)[:120]}: not a shard spec ({e.strerror})") from None


def _list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], allow_pipe: bool | None) -> list[str]:
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if looks_like_url(text):
            return [typed(url, allow_pipe) for url in braceexpand.braceexpand(text)]
        if Path(text).is_dir():
            paths = sorted(str(p) for p in Path(text).glob("*.tar"))
            if not paths:
                raise DataError(f"{text}: folder holds no .tar shards")
            return paths
        paths = []
        for part in braceexpand.braceexpand(text):
            paths.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    else:
        paths = [p if is_url(p) else typed(str(p), allow_pipe) for p in spec]
    if not paths:
        raise DataError(f"{spec}: no shards")
    for p in paths:
        if not is_url(p) and not Path(p).is_file():
            raise MissingFileError(f"{p}: no such shard")
    return paths


def shard_sizes(shards: list[str]) -> list[int]:
    """Samples per shard, from the sizes.json beside them, else by reading the tar headers."""
    sizes = []
    cache: dict[Path, dict] = {}
    for shard in shards:
        path = Path(shard)
        if is_url(shard):  # no sizes.json to read beside it: counted from the (fetched) shard
            sizes.append(len({s["__key__"] for s in read_tar(shard) if not isinstance(s, Skip)}))
            continue
        if path.parent not in cache:  # one sizes.json per folder, read once
            cache[path.parent] = _read_sizes(path.parent / SIZES_FILE)
        table = cache[path.parent]
        if path.name in table:
            sizes.append(int(table[path.name]))
        else:
            sizes.append(len({s["__key__"] for s in read_tar(shard) if not isinstance(s, Skip)}))
    return sizes


def _read_sizes(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, RecursionError):
        return {}


def read_tar(shard: str) -> Iterator[dict | Skip]:
    """Samples {'__key__', '__url__', ext: bytes} of one shard, grouping consecutive members by key.
    A damaged archive ends the shard with a Skip naming where it broke."""
    current: dict | None = None
    try:
        for name, data in tar_members(shard):
            key, ext = _key_ext(name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": shard}
            current[ext.lower()] = data
    except (TarDamage, OSError) as e:
        broken = _key_ext(e.member)[0] if getattr(e, "member", None) else None
        if current is not None and broken is not None and broken != current["__key__"]:
            yield current  # complete: the cut is in a later sample's member
            current = None
        yield Skip(shard, broken or (current["__key__"] if current else "?"), f"damaged tar ({e})")
        return
    if current is not None:
        yield current


def _key_ext(member: str) -> tuple[str, str]:
    key, _, ext = member.split("/")[-1].partition(".")
    return key, ext


def shard_captions(spec) -> Iterator[str]:
    """Every readable caption (txt member) of the shards, in order (images are not decoded)."""
    for shard in list_shards(spec):
        for sample in read_tar(shard):
            if isinstance(sample, Skip) or "txt" not in sample:
                continue
            try:
                yield read_caption(sample["txt"], sample["__key__"])
            except ValueError:
                continue  # counted when the pipeline meets it
