"""The members of a tar shard, read fast and safely.

Python's tarfile spends ~40 us of interpreted header parsing per member, as much as decoding a
28x28 PNG, and it trusts its headers: a member whose size field says -1000 makes it loop forever.
So every archive is parsed here, over an mmap (compressed ones are decompressed as the scan goes,
a member at a time, up to a bound on the total): ustar, GNU (long names, base-256 sizes) and pax
(path and size records) headers. A header that does not parse, a size that runs past the end of the file or over
`MAX_MEMBER`, a bad checksum: the scan stops there with a `TarDamage` that says where, after the
members before it. Every header moves the scan forward by at least one block, so it always ends.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import mmap
import posixpath
import re
import zlib
from collections.abc import Iterator

from .remote import local_shard

BLOCK = 512
MAX_MEMBER = 1 << 28  # bytes; a larger member is damage, not a sample (images and captions are far smaller)
MAX_DECOMPRESSED = 4 << 30  # bytes a compressed archive may decompress to (a time bound: memory holds a member)
MAX_EXTENDED = 1 << 20  # bytes of a pax or GNU long-name header
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: no data, not members
# pax (local, global, Solaris' local), GNU long name and long link: they describe the next member
_EXTENDED = (b"x", b"g", b"X", b"L", b"K")
_COMPRESSED = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f), b"BZh": bz2.BZ2File,
               b"\xfd7zXZ\x00": lzma.LZMAFile}

Member = tuple[str, int, int]  # name, data offset, size


class TarDamage(Exception):
    """The archive is unreadable from here on; the members before it were read. `member`: the
    member whose data is cut short, where known."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular member in order. Raises TarDamage where the archive breaks
    (after yielding what came before), OSError if it cannot be opened. A compressed archive is
    decompressed as it is read: memory holds a member at a time, never the whole archive."""
    with _open(path) as data:
        try:
            for name, start, size in _walk(data):
                yield name, data[start:start + size]
        except TarDamage as e:
            if data.damage is None:
                raise
            raise TarDamage(str(data.damage), e.member) from None  # the archive was cut where decompression broke off
        if data.damage is not None:
            raise data.damage


def tar_index(path: str) -> tuple[list[Member], TarDamage | None]:
    """(name, data offset, size) of every regular member of an uncompressed archive, so that any
    process can read a member by position, and the damage that ended the archive early (None: it
    is whole). A compressed archive has no such offsets: TarDamage."""
    path = local_shard(path)
    with open(path, "rb") as f:
        if _compression(f.read(6)) is not None:
            raise TarDamage("compressed archive: its members cannot be read by offset")
    members: list[Member] = []
    with _open(path) as data:
        try:
            members.extend(_walk(data))
        except TarDamage as e:
            return members, e
    return members, None


class _Mapped:
    """An uncompressed archive's bytes: the file, memory-mapped (`reach(end)`: how far they go, up
    to `end`)."""
    damage = None

    def __init__(self, data: mmap.mmap):
        self.data = data

    def reach(self, end: int) -> int:
        return min(end, len(self.data))

    def __getitem__(self, span: slice) -> bytes:
        return self.data[span]


class _Inflating:
    """A compressed archive's bytes, decompressed as they are asked for: slices move forward only,
    and what lies before the latest slice's end is dropped, so that memory holds about one member.
    At most MAX_DECOMPRESSED bytes; `damage` says what stopped the stream early (None: it ended)."""

    def __init__(self, stream):
        self.stream, self.buffer, self.base, self.total = stream, bytearray(), 0, 0
        self.damage: TarDamage | None = None
        self.ended = False

    def _fill(self, end: int) -> None:
        while self.base + len(self.buffer) < end and not self.ended:
            try:
                chunk = self.stream.read(1 << 20)
            except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:
                self.damage, self.ended = TarDamage(f"damaged compressed data ({e})"), True
                return
            self.total += len(chunk)
            if not chunk or self.total > MAX_DECOMPRESSED:
                self.ended = True
                if chunk:
                    self.damage = TarDamage(f"decompresses to over {MAX_DECOMPRESSED} bytes")
                return
            self.buffer += chunk

    def reach(self, end: int) -> int:
        self._fill(end)
        return min(end, self.base + len(self.buffer))

    def __getitem__(self, span: slice) -> bytes:
        """Bytes [start, stop); the scan asks for each range once, in order, so what lies before
        `stop` is dropped after: in place for a small range (bytearray drops a prefix without
        copying), and after a large one by keeping the read-ahead in a fresh buffer, which frees
        the member's memory (a copy per header would cost more than the decompression)."""
        self._fill(span.stop)
        used = min(span.stop - self.base, len(self.buffer))
        with memoryview(self.buffer) as view:
            out = bytes(view[span.start - self.base:used])
            if used >= 1 << 20:
                self.buffer = bytearray(view[used:])
        if used < 1 << 20:
            del self.buffer[:used]
        self.base += used
        return out


@contextlib.contextmanager
def _open(path: str) -> Iterator[_Mapped | _Inflating]:
    with open(local_shard(path), "rb") as f:
        if f.seek(0, 2) == 0:
            raise TarDamage("empty file")
        f.seek(0)
        opener = _compression(f.read(6))
        f.seek(0)
        if opener is not None:
            with opener(f) as stream:
                yield _Inflating(stream)
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield _Mapped(data)


def _compression(head: bytes):
    return next((opener for magic, opener in _COMPRESSED.items() if head.startswith(magic)), None)


# octal digits between spaces, then anything after a NUL (regular expressions run in C: a shard of
# small samples has a header every kilobyte)
_OCTAL = re.compile(rb" *([0-7]*) *(?:\x00.*)?", re.S)


def _number(field: bytes) -> int | None:
    """A header number: octal digits (NUL- or space-terminated) or GNU base-256; None when it is
    anything else, negative included."""
    if field[:1] == b"\x80":  # base-256, positive (0xff would be negative)
        return int.from_bytes(field[1:], "big")
    match = _OCTAL.fullmatch(field)
    return int(match.group(1) or b"0", 8) if match else None


# mode, uid, gid, mtime, devmajor, devminor: unused here, but a header whose numbers do not parse
# is damaged (tarfile stops there too)
_OTHER_NUMBERS = (slice(100, 108), slice(108, 116), slice(116, 124), slice(136, 148), slice(329, 337),
                  slice(337, 345))


def _header_ok(header: bytes) -> bool:
    numbers_ok = all(header[f][:1] in (b"\x80", b"\xff") or _OCTAL.fullmatch(header, f.start, f.stop)
                     for f in _OTHER_NUMBERS)
    return numbers_ok and _checksum_ok(header)


_HIGH_BYTES = bytes(range(128, 256))


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:  # nearly always: the signed sum (which tarfile also accepts) is computed only if not
        return True
    rest = header[:148] + header[156:]
    high = len(rest) - len(rest.translate(None, _HIGH_BYTES))  # bytes over 127, counted in C
    return stored is not None and stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[str, str] | None:
    """The "LEN key=value\\n" records of a pax header; None when they do not parse."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:].strip(b"\0"):
        length_text, sep, _ = data[pos:pos + 20].partition(b" ")
        if not sep or not length_text.isdigit() or int(length_text) <= len(length_text) + 1:
            return None
        record = data[pos:pos + int(length_text)]
        if len(record) < int(length_text) or not record.endswith(b"\n"):
            return None
        key, eq, value = record[len(length_text) + 1:-1].partition(b"=")
        if not eq:
            return None
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += int(length_text)
    return records


def _clean_name(raw: bytes) -> str:
    """A member name as text (bytes that are not UTF-8 replaced), relative, without '..' parts."""
    name = posixpath.normpath(raw.decode("utf-8", "replace")).lstrip("/")
    while name.startswith("../"):
        name = name[3:]
    return "" if name in (".", "..") else name


def _walk(data: _Mapped | _Inflating) -> Iterator[Member]:
    """(name, data offset, size) of each regular member, in order, as the scan reaches it; raises
    TarDamage where the archive breaks (a clean end returns)."""
    pos = 0
    last: str | None = None  # the last member's name
    next_name: bytes | None = None  # from a GNU long-name or pax header, for the member after it
    next_size: int | None = None  # from a pax header
    extended_at: int | None = None  # where the extended headers of the next member began
    while data.reach(pos + BLOCK) == pos + BLOCK:
        header = data[pos:pos + BLOCK]
        if not any(header):  # end-of-archive marker
            if extended_at is not None:
                raise TarDamage(f"the extended tar header at byte {extended_at} describes no member")
            return
        size, flag, start = _number(header[124:136]), header[156:157], pos + BLOCK
        if size is None or not _header_ok(header):
            raise TarDamage(f"bad tar header at byte {pos}")
        if flag in _EXTENDED:
            if size > MAX_EXTENDED or data.reach(start + size) < start + size:
                raise TarDamage(f"extended tar header at byte {pos} is {size} bytes long")
            extended = data[start:start + size]
            # the first extended header of a member wins where several name it (as in tarfile)
            if flag == b"L" and next_name is None:
                next_name = extended.split(b"\0", 1)[0]
            elif flag in (b"x", b"X", b"g"):
                records = _pax_records(extended)
                if records is None or not records.get("size", "0").isdigit():
                    raise TarDamage(f"malformed pax header at byte {pos}")
                if flag == b"g" and ("path" in records or "size" in records):  # they would apply to all later members
                    raise TarDamage(f"global pax header at byte {pos} sets a path or size: not supported")
                if next_name is None and "path" in records:
                    next_name = records["path"].encode()
                if next_size is None and "size" in records:
                    next_size = int(records["size"])
            extended_at = pos if extended_at is None else extended_at
            pos = start + -(-size // BLOCK) * BLOCK
            continue
        if next_size is not None:
            size = next_size
        prefix = header[345:500].split(b"\0", 1)[0]  # ustar; tarfile reads it in every format too
        raw = header[:100].split(b"\0", 1)[0]
        name = _clean_name(next_name if next_name is not None else (prefix + b"/" + raw if prefix else raw))
        next_name = next_size = extended_at = None
        if flag in _NO_DATA:
            pos = start
            continue
        if flag == b"S":
            raise TarDamage(f"sparse member {name} at byte {pos}: not supported", name)
        if size > MAX_MEMBER:
            raise TarDamage(f"member {name} is {size} bytes, over the limit of {MAX_MEMBER}", name)
        if data.reach(start + size) < start + size:
            raise TarDamage(f"unexpected end of data in member {name}", name)
        if flag in _REGULAR:  # other (unknown) types are skipped, as tarfile skips them
            last = name
            yield name, start, size
        pos = start + -(-size // BLOCK) * BLOCK
    end = data.reach(pos + BLOCK)
    if pos > end:  # the last member's padding is cut: the archive was truncated after it
        raise TarDamage("unexpected end of data", last)
    if any(data[pos:end]):
        raise TarDamage(f"truncated tar header at byte {pos}")
