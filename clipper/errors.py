"""The errors a user can cause, as opposed to bugs.

Every error that bad input can raise (a config, a model file, an image, a shard, an output folder
of another verb, a command-line value) is a `ClipperError` whose message names the file or field.
The CLI prints those as one line and exits 2; anything else is a bug and keeps its traceback.
They also subclass ValueError (or the built-in they refine), so callers of the library that catch
ValueError keep working.
"""

from __future__ import annotations


class ClipperError(Exception):
    """Bad input, named: the message says which file or field and what is wrong with it."""


class ConfigError(ClipperError, ValueError):
    """A config, preset, flag or option that is unknown, malformed or contradictory."""


class CheckpointError(ClipperError, ValueError):
    """A weights file or model directory that cannot be used."""


class ImageError(ClipperError, ValueError):
    """An input that is not a readable image."""


class DataError(ClipperError, ValueError):
    """Input data (shards, folders, list, text or JSON files, embedding and index folders) that
    is missing or malformed."""


class PackageError(ClipperError, RuntimeError):
    """A Debian package's files are neither installed nor fetchable; the message says what to run."""


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder that was named does not exist."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for a one-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
