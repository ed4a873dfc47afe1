"""Small file helpers shared by every writer and reader: atomic writes, JSON, JSONL and line
files, each failing with a `DataError` that names the file."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes.

    A reader sees the old file or the new one, never half of one, whatever kills the writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _dumps(obj: Any, **kwargs: Any) -> str:
    # File names that are not UTF-8 reach here as lone surrogates (Python's surrogateescape); as
    # JSON escapes (\udcXX) they are valid UTF-8 text, and read back as the same str.
    return json.dumps(obj, ensure_ascii=False, **kwargs).encode("utf-8", "backslashreplace").decode("utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, _dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(_dumps(r) + "\n" for r in rows))


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing, unreadable or non-UTF-8 file is a DataError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: {what} is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable {what} ({e.strerror})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: {what} is JSON nested too deeply") from None


def read_json_object(path: str | os.PathLike, what: str, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """A JSON object with (at least) `fields` of the given types; anything else names the field."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {what} is not a JSON object")
    for name, kind in fields.items():
        if name not in obj:
            raise DataError(f"{path}: {what} has no field {name!r}")
        if not isinstance(obj[name], kind):
            raise DataError(f"{path}: {what} field {name!r} has the wrong type ({type(obj[name]).__name__})")
    return obj


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[dict]:
    """One JSON object per non-blank line; a bad line is named by its number."""
    rows = []
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{path}:{n}: {what} line is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: {what} line is not a JSON object")
        rows.append(row)
    return rows


def read_lines(path: str | os.PathLike, what: str, comments: bool = True) -> list[str]:
    """The stripped, non-blank lines of a UTF-8 file (without those starting with "#" if `comments`);
    a file with none is an error."""
    lines = [line.strip() for line in read_text(path, f"{what} file").splitlines()]
    lines = [line for line in lines if line and not (comments and line.startswith("#"))]
    if not lines:
        raise DataError(f"{path}: no {what} in it (one per line)")
    return lines


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether `host` accepts an HTTPS connection now (a quick check before a hub download that
    would otherwise retry for about a minute offline)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
