"""Shards named by URL, as webdataset names them: `pipe:COMMAND` (the command's standard output),
`http(s)://...`, and any other fsspec URL (`s3://`, `gs://`, ...: needs fsspec and that
filesystem's package). Each is copied once into a local cache, under a temporary name and within
a size and time bound, then read like a local shard (members are read by offset: that needs a
file). The cache is CLIPPER_SHARD_CACHE (default ~/.cache/clipper/shards); delete it at will.

A URL is a `Url`, made only from what the user typed (a command-line spec, a training config,
a list in code) by `as_url`; every other string is a file name, whatever it looks like, so a file
called `pipe:rm -rf ~;.png` in a folder, a glob or an ids.jsonl row never runs nor fetches
anything. `pipe:` runs a shell command, so even typed it needs an opt-in: `--allow-pipe`
(CLIPPER_ALLOW_PIPE=1) or a training config's `allow_pipe`.
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

from ..errors import ConfigError
from ..io import atomic_path

MAX_SHARD_BYTES = int(os.environ.get("CLIPPER_MAX_SHARD_BYTES", 16 << 30))
FETCH_TIMEOUT_S = float(os.environ.get("CLIPPER_FETCH_TIMEOUT_S", 600))
_CHUNK = 1 << 20


PIPE_ENV = "CLIPPER_ALLOW_PIPE"


class ShardFetchError(OSError):
    """A shard URL that could not be fetched: an unreadable shard, skipped and named like one."""


class Url(str):
    """A shard URL that the user gave (see the module docstring); made by `as_url` only."""


def looks_like_url(text: str) -> bool:
    """Whether typed text names a URL (`pipe:` or `scheme://`); never asked of names found in data."""
    return text.startswith("pipe:") or bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text))


def pipe_allowed() -> bool:
    return os.environ.get(PIPE_ENV, "") == "1"


def as_url(text: str, allow_pipe: bool | None = None) -> Url:
    """Typed text as a URL to fetch; a `pipe:` command only with `allow_pipe` (None: CLIPPER_ALLOW_PIPE)."""
    if text.startswith("pipe:") and not (pipe_allowed() if allow_pipe is None else allow_pipe):
        raise ConfigError(f"{text[:100]}: a pipe: shard runs a shell command; pass --allow-pipe (or set "
                          f"{PIPE_ENV}=1, or allow_pipe in a training config) to allow it")
    return Url(text)


def typed(text: str, allow_pipe: bool | None = None) -> str:
    """Typed text as what it names: a `Url` where it looks like one (see `as_url`), else a file name."""
    return as_url(text, allow_pipe) if looks_like_url(text) else text


def is_url(name: str) -> bool:
    """Whether `name` is a URL the user gave; any plain string is a file name."""
    return isinstance(name, Url)


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
    """The command's standard output into `dest`. Its standard error is read as it comes (a command
    that fills the pipe would otherwise block forever) and its first line kept for the message."""
    command = url[len("pipe:"):]
    proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    said = b""
    try:
        with open(dest, "wb") as out:
            total, streams = 0, [proc.stdout, proc.stderr]
            while streams:
                ready, _, _ = select.select(streams, [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise ShardFetchError(f"{url}: the command `{command[:100]}` did not finish within "
                                          f"{FETCH_TIMEOUT_S:g} s (CLIPPER_FETCH_TIMEOUT_S)")
                for stream in ready:
                    chunk = stream.read1(_CHUNK)
                    if not chunk:
                        streams.remove(stream)
                    elif stream is proc.stderr:
                        said = (said + chunk)[:2000]
                    else:
                        total += len(chunk)
                        _check_bounds(url, total, deadline)
                        out.write(chunk)
        status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if status != 0:
            first = said.decode("utf-8", "replace").strip().splitlines()
            raise ShardFetchError(f"{url}: the command exited with status {status}"
                                  + (f" ({first[0]})" if first else ""))
    except subprocess.TimeoutExpired:
        raise ShardFetchError(f"{url}: the command `{command[:100]}` did not exit within {FETCH_TIMEOUT_S:g} s") \
            from None
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

