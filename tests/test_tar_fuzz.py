"""The tar reader on mutated shards: signed, huge and non-octal sizes, bad checksums, '../' and
non-UTF-8 names, link, folder and FIFO members, unknown types, truncation. Each read ends within a
second and 50 MB, and yields the members tarfile yields, or a prefix of them and a TarDamage.

The suite runs 400 mutations; the full campaign (and its figures) runs as a script:

    python tests/test_tar_fuzz.py --n 10000
"""

from __future__ import annotations

import argparse
import io
import json
import random
import signal
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

from clipper.data.tar import TarDamage, _clean_name, tar_members

SIZE, CHECKSUM, TYPE, NAME = slice(124, 136), slice(148, 156), slice(156, 157), slice(0, 100)


def base_shards() -> list[bytes]:
    """Small archives in each format, with every kind of member the reader meets."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
            names = ["k0.png", "k0.txt", "dir/k1.json", "k1.png"]
            if fmt != tarfile.USTAR_FORMAT:
                names += ["long" * 30 + ".txt", "caf\udce9.png"]  # a long name; a name that is not UTF-8
            for i, name in enumerate(names):
                data = bytes((i * 7 + j) % 256 for j in range(300 + 400 * i))
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                if i == 1:
                    for kind, extra in ((tarfile.DIRTYPE, "d"), (tarfile.SYMTYPE, "l"), (tarfile.FIFOTYPE, "f")):
                        other = tarfile.TarInfo(f"special-{extra}")
                        other.type, other.linkname = kind, "k0.png"
                        tar.addfile(other)
        out.append(buf.getvalue())
    return out


def _headers(data: bytes) -> list[int]:
    """Offsets of the headers tarfile finds in an intact archive (extended headers included)."""
    offsets, pos = [], 0
    while pos + 512 <= len(data) and any(data[pos:pos + 512]):
        offsets.append(pos)
        size = int(data[pos + 124:pos + 135].strip(b"\0 ") or b"0", 8)
        regular = data[pos + 156:pos + 157] in (b"0", b"\0", b"7", b"x", b"g", b"L", b"K")
        pos += 512 + (-(-size // 512) * 512 if regular else 0)
    return offsets


def _fix_checksum(h: bytearray) -> None:
    h[CHECKSUM] = b" " * 8
    h[CHECKSUM] = b"%06o\0 " % sum(h)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of `data`, and what it was."""
    b = bytearray(data)
    offsets = _headers(data)
    pos = rng.choice(offsets)
    h = bytearray(b[pos:pos + 512])
    kind = rng.choice(["size", "size", "checksum", "type", "name", "truncate", "bytes"])
    if kind == "size":
        value = rng.choice([b"-1000", b"-1", b"77777777777", b"12x4", b"+20", b" 7 7", b"\x80" + b"\x00" * 7 + b"\xff" * 3,
                            b"\xff" * 12, b"%o" % rng.randrange(0, 1 << 20), b""])
        h[SIZE] = value.ljust(12, b"\0")[:12]
    elif kind == "checksum":
        h[rng.randrange(0, 512)] ^= 1 << rng.randrange(8)
    elif kind == "type":
        h[TYPE] = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"x", b"g", b"L", b"K", b"A", b"\xff"])
    elif kind == "name":
        h[NAME] = rng.choice([b"../../etc/passwd", b"/abs/k9.png", b"./k9.png", b"\xff\xfe.png", b"..", b""]).ljust(100, b"\0")
    elif kind == "truncate":
        return bytes(b[:rng.randrange(0, len(b))]), f"truncate at {pos}"
    else:
        for _ in range(rng.randint(1, 8)):
            h[rng.randrange(0, 512)] = rng.randrange(256)
    if kind != "checksum" and rng.random() < 0.8:  # most mutations keep a valid checksum, to get past it
        _fix_checksum(h)
    b[pos:pos + 512] = h
    return bytes(b), f"{kind} at {pos}"


class _Timeout(Exception):
    pass


def _tarfile_members(path: Path, seconds: int = 2) -> tuple[list[tuple[str, bytes]], bool]:
    """tarfile's regular members (names cleaned as ours are) and whether it read the archive to
    its end; it can loop forever on a negative size, so it gets `seconds`."""
    def alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(path, "r|*", encoding="utf-8", errors="surrogateescape") as tar:
            for m in tar:
                if m.isfile():
                    members.append((_clean_name(m.name.encode("utf-8", "surrogateescape")),
                                    tar.extractfile(m).read()))
        return members, True
    except (_Timeout, tarfile.TarError, EOFError, OSError, ValueError, OverflowError):
        return members, False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(path: Path) -> dict:
    """Read `path` with clipper's reader, against tarfile; the figures of the read."""
    tracemalloc.start()
    t0 = time.perf_counter()
    ours, damage = [], None
    try:
        for member in tar_members(str(path)):
            ours.append(member)
    except TarDamage as e:
        damage = str(e)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    theirs, whole = _tarfile_members(path)
    if damage is None:  # a clean read must be tarfile's whole read
        agrees = whole and ours == theirs
    else:  # a damaged one: never a member tarfile would not yield
        agrees = ours == theirs[:len(ours)]
    return {"seconds": seconds, "peak_bytes": peak, "damage": damage, "members": len(ours), "agrees": agrees,
            "tarfile_whole": whole}


def campaign(n: int, folder: Path, seed: int = 0) -> list[dict]:
    rng, bases = random.Random(seed), base_shards()
    results = []
    for i in range(n):
        data, what = mutate(rng.choice(bases), rng)
        path = folder / f"m{i % 8}.tar"
        path.write_bytes(data)
        results.append({"mutation": what, **check(path)})
    return results


def test_mutated_shards_end_fast_and_agree_with_tarfile(tmp_path):
    results = campaign(400, tmp_path)
    bad = [r for r in results if not r["agrees"] or r["seconds"] > 1 or r["peak_bytes"] > 50 << 20]
    assert not bad, bad[:3]
    assert sum(r["damage"] is not None for r in results) > 100  # the mutations did break archives
    assert any(r["damage"] is not None and not r["tarfile_whole"] for r in results)


def test_intact_shards_read_whole(tmp_path):
    for i, data in enumerate(base_shards()):
        (tmp_path / f"{i}.tar").write_bytes(data)
        result = check(tmp_path / f"{i}.tar")
        assert result["damage"] is None and result["agrees"] and result["members"] >= 4
    names = [name for name, _ in tar_members(str(tmp_path / "1.tar"))]
    assert "caf\ufffd.png" in names and not any(n.startswith("special") for n in names)  # no links, dirs, fifos


if __name__ == "__main__":
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = campaign(args.n, Path(tmp))
        wall = time.perf_counter() - t0
    summary = {"mutated_shards": len(results), "wall_s": round(wall, 1),
               "disagreements": sum(not r["agrees"] for r in results),
               "max_read_s": round(max(r["seconds"] for r in results), 4),
               "max_peak_mib": round(max(r["peak_bytes"] for r in results) / 2**20, 2),
               "damaged": sum(r["damage"] is not None for r in results),
               "tarfile_failed_or_hung": sum(not r["tarfile_whole"] for r in results)}
    print(json.dumps(summary, indent=2))
    sys.exit(1 if summary["disagreements"] or summary["max_read_s"] > 1 or summary["max_peak_mib"] > 50 else 0)
