"""The members of a tar shard, read fast.

Python's tarfile spends ~40 us of interpreted header parsing per member, as much as decoding a
28x28 PNG; a shard of small samples (3 members each) then costs the data worker more in tar
headers than in images. Plain ustar archives (what `clipper data` and most shard writers make)
are parsed here directly over an mmap; anything else (compressed, pax or GNU long-name headers,
base-256 sizes) goes through tarfile, with the same results.
"""

from __future__ import annotations

import mmap
import tarfile
from collections.abc import Iterator

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_NOT_FILES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: no data to read
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class TarDamage(Exception):
    """The archive is unreadable from here on; the members before it were read. `member`: the
    member whose data is cut short, where known."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular member in order. Raises TarDamage where the archive breaks
    (after yielding what came before), OSError if it cannot be opened."""
    if _compressed(path):
        yield from _tarfile_members(path)
        return
    members, damage = tar_index(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, start, length in members:
            yield name, data[start:start + length]
    if damage:
        raise damage


def tar_index(path: str) -> tuple[list[tuple[str, int, int]], TarDamage | None]:
    """(name, data offset, size) of every regular member of an uncompressed archive, so that any
    process can read a member by position, and the damage that ended the archive early (None: it
    is whole). A compressed archive has no such offsets: TarDamage."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise TarDamage("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if any(data[:len(m)] == m for m in _COMPRESSED):
                raise TarDamage("compressed archive: its members cannot be read by offset")
            scan = _ustar_scan(data)
    if scan is None:
        return _tarfile_index(path, size)
    members, damage = scan
    return members, TarDamage(*damage) if damage else None


def _compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return any(head[:len(m)] == m for m in _COMPRESSED)


def _tarfile_members(path: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:
        raise TarDamage(str(e)) from None


def _tarfile_index(path: str, size: int) -> tuple[list[tuple[str, int, int]], TarDamage | None]:
    """tar_index for what the ustar scan leaves to tarfile (pax and GNU headers, base-256 sizes)."""
    members: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    return members, TarDamage(f"unexpected end of data in member {member.name}", member.name)
                members.append((member.name, member.offset_data, member.size))
    except (tarfile.TarError, EOFError) as e:
        return members, TarDamage(str(e))
    return members, None


def _octal(field: bytes) -> int | None:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _ustar_scan(data) -> tuple[list[tuple[str, int, int]], tuple[str, str | None] | None] | None:
    """(name, data offset, size) of each regular member and the damage that ended the scan (None:
    a clean end); None when the archive needs tarfile."""
    members: list[tuple[str, int, int]] = []
    pos, end = 0, len(data)
    while pos + BLOCK <= end:
        header = data[pos:pos + BLOCK]
        if not any(header):  # end-of-archive marker
            return members, None
        if header[124] & 0x80:  # base-256 size (members over 8 GiB)
            return None
        size, checksum = _octal(header[124:136]), _octal(header[148:156])
        if size is None or checksum is None or sum(header) - sum(header[148:156]) + 8 * 32 != checksum:
            return (members, (f"bad tar header at byte {pos}", None)) if members else None  # tarfile words its own
        flag = header[156:157]
        if flag not in _REGULAR and flag not in _NOT_FILES:
            return None  # pax, GNU long names, sparse files...
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
        start = pos + BLOCK
        if flag in _REGULAR:
            if start + size > end:
                return members, (f"unexpected end of data in member {name}", name)
            members.append((name, start, size))
        pos = start + -(-size // BLOCK) * BLOCK if flag in _REGULAR else start
    if pos > end:  # the last member's padding is cut: the archive was truncated after it
        return members, ("unexpected end of data", members[-1][0] if members else None)
    if any(data[pos:end]):
        return members, (f"truncated tar header at byte {pos}", None)
    return members, None
