"""Shards named by URL, as webdataset names them: `pipe:COMMAND` (the command's standard output),
`http(s)://...`, and any other fsspec URL (`s3://`, `gs://`, ...: needs fsspec and that
filesystem's package). Each is copied once into a local cache, under a temporary name and within
a size and time bound, then read like a local shard (members are read by offset: that needs a
file). The cache is CLIPPER_SHARD_CACHE (default ~/.cache/clipper/shards); delete it at will.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import time
import urllib.request
from pathlib import Path

from ..io import atomic_path

MAX_SHARD_BYTES = int(os.environ.get("CLIPPER_MAX_SHARD_BYTES", 16 << 30))
FETCH_TIMEOUT_S = float(os.environ.get("CLIPPER_FETCH_TIMEOUT_S", 600))
_CHUNK = 1 << 20


class ShardFetchError(OSError):
    """A shard URL that could not be fetched: an unreadable shard, skipped and named like one."""


def is_url(name: str) -> bool:
    return name.startswith("pipe:") or bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", name))


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPPER_SHARD_CACHE", "~/.cache/clipper/shards")).expanduser()


def local_shard(name: str) -> str:
    """A local path for shard `name`: itself, or the cached copy of its URL (fetched on first use)."""
    if not is_url(name):
        return name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name.rstrip("/").rsplit("/", 1)[-1].split()[-1])[-60:]
    target = cache_dir() / f"{hashlib.sha1(name.encode()).hexdigest()[:16]}-{base}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            _fetch(name, Path(tmp))
    return str(target)


def _fetch(url: str, dest: Path) -> None:
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    if url.startswith("pipe:"):
        _fetch_pipe(url, dest, deadline)
        return
    try:
        if url.startswith(("http://", "https://")):
            source = urllib.request.urlopen(url, timeout=60)
        else:
            try:
                import fsspec
            except ImportError:
                raise ShardFetchError(f"{url}: reading this URL needs fsspec and its filesystem package "
                                      "(pip install fsspec s3fs for s3://)") from None
            source = fsspec.open(url, "rb").open()
        with source, open(dest, "wb") as out:
            total = 0
            while chunk := source.read(_CHUNK):
                total += len(chunk)
                _check_bounds(url, total, deadline)
                out.write(chunk)
    except ShardFetchError:
        raise
    except Exception as e:  # network and filesystem errors come in many types
        raise ShardFetchError(f"{url}: could not fetch ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") \
            from None


def _fetch_pipe(url: str, dest: Path, deadline: float) -> None:
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with open(dest, "wb") as out:
            total = 0
            while True:
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise ShardFetchError(f"{url}: no output within {FETCH_TIMEOUT_S:g} s "
                                          "(CLIPPER_FETCH_TIMEOUT_S)")
                chunk = proc.stdout.read1(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                _check_bounds(url, total, deadline)
                out.write(chunk)
        status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if status != 0:
            said = proc.stderr.read(2000).decode("utf-8", "replace").strip().splitlines()
            raise ShardFetchError(f"{url}: the command exited with status {status}"
                                  + (f" ({said[0]})" if said else ""))
    except subprocess.TimeoutExpired:
        raise ShardFetchError(f"{url}: the command did not exit within {FETCH_TIMEOUT_S:g} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def _check_bounds(url: str, total: int, deadline: float) -> None:
    if total > MAX_SHARD_BYTES:
        raise ShardFetchError(f"{url}: larger than {MAX_SHARD_BYTES} bytes (CLIPPER_MAX_SHARD_BYTES)")
    if time.monotonic() > deadline:
        raise ShardFetchError(f"{url}: not fetched within {FETCH_TIMEOUT_S:g} s (CLIPPER_FETCH_TIMEOUT_S)")

