"""Image bombs, names that are not UTF-8, damaged shards and failing writers: each is a named
skip or a one-line error, fast, and nothing already written is lost."""

import io
import os
import struct
import tarfile
import time
import zlib

import pytest
from PIL import Image, PngImagePlugin

from clipper.cli import main
from clipper.data.samples import Rejected, Sample
from clipper.data.shards import write_shards
from clipper.embed_dir import embed_folder
from clipper.errors import DataError, ImageError
from clipper.images import decode_image
from clipper.io import read_jsonl
from conftest import rgb_tiny


def _png(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _with_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR claiming another size (pixels not there: only the header is read)."""
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def _ztxt_bomb() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (8 << 20), zip=True)  # 8 MB of text in a few KB
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


@pytest.mark.parametrize("name,data,why", [
    ("ztxt", _ztxt_bomb(), "not a readable image"),
    ("long", _with_size(_png(), 4_000_000, 10), "aspect ratio"),
    ("huge", _with_size(_png(), 40_000, 40_000), "pixel limit"),
    ("eps", EPS, "not an image"),
    ("zero", _with_size(_png(), 0, 10), "not an image"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 12 else "")
def test_image_bombs_are_refused_fast_with_the_input_named(name, data, why):
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=f"{name}.png: .*{why}"):
        decode_image(data, f"{name}.png")
    assert time.perf_counter() - t0 < 1.0
    assert len(data) < 100_000  # small on disk: the bomb is in what it asks for


def test_a_folder_with_bombs_and_foreign_names_embeds_the_rest(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png())
    (folder / "ztxt.png").write_bytes(_ztxt_bomb())
    (folder / "long.png").write_bytes(_with_size(_png(), 4_000_000, 10))
    foreign = os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8
    (folder / foreign).write_bytes(_png())
    rgb_tiny().save(tmp_path / "m")
    assert main(["embed", str(folder), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"),
                 "--workers", "0"]) == 0
    ids = [row["id"] for row in read_jsonl(tmp_path / "e" / "ids.jsonl")]
    assert sorted(os.path.basename(i) for i in ids) == sorted(["good.png", foreign])
    skipped = {os.path.basename(r["id"]): r["reason"] for r in read_jsonl(tmp_path / "e" / "skipped.jsonl")}
    assert "aspect ratio" in skipped["long.png"] and "not a readable image" in skipped["ztxt.png"]
    # a second run finds the finished output (the resume path reads what the first one wrote)
    assert main(["embed", str(folder), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"),
                 "--workers", "0"]) == 0


def test_embedding_a_damaged_shard_keeps_the_samples_before_the_damage(tmp_path):
    write_shards([Sample(key=f"k{i}", image=_png(), text=f"pic {i}") for i in range(6)], tmp_path / "s")
    data = bytearray((tmp_path / "s" / "00000.tar").read_bytes())
    header = 512 * 6 * 4  # the fifth sample's first header (3 members of one header + one data block each)
    data[header + 124:header + 136] = b"-1000".ljust(12, b"\0")  # a negative size, checksum fixed
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])
    (tmp_path / "s" / "00000.tar").write_bytes(bytes(data))
    model = rgb_tiny()
    t0 = time.perf_counter()
    manifest = embed_folder(model, "tiny", tmp_path / "s", tmp_path / "e", workers=0, progress=False)
    assert time.perf_counter() - t0 < 30 and manifest["images"] == 4
    (reason,) = [r["reason"] for r in read_jsonl(tmp_path / "e" / "skipped.jsonl")]
    assert "bad tar header at byte 12288" in reason


def test_a_failed_shard_write_leaves_the_old_set_whole(tmp_path):
    first = write_shards([Sample(key=f"k{i}", image=_png(), text="old") for i in range(5)], tmp_path / "s",
                         samples_per_shard=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}

    def failing():
        yield Sample(key="n0", image=_png(), text="new")
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError):
        write_shards(failing(), tmp_path / "s")
    with pytest.raises(DataError, match="no sample was written"):
        write_shards([Rejected("x.png", "x.png: not an image")], tmp_path / "s")
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before and first["shards"] == 3
    # a complete rewrite replaces it, fewer shards included
    write_shards([Sample(key="n0", image=_png(), text="new")], tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == ["00000.tar"]
    with tarfile.open(tmp_path / "s" / "00000.tar") as tar:
        assert tar.extractfile("n0.txt").read() == b"new"
    assert not list((tmp_path / "s").glob(".partial-*"))


def test_a_compressed_shard_is_read_a_member_at_a_time(tmp_path, monkeypatch):
    """A small .tar.gz of six 16 MB members: reading it holds a few members (the one read, the one
    handed out, the sample before it), not the 96 MB archive; past the bound on the total it ends
    as damage."""
    import gzip
    import tracemalloc

    from clipper.data import tar as tar_module
    from clipper.data.reader import Skip, read_tar

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for i in range(6):
            info = tarfile.TarInfo(f"k{i}.bin")
            info.size = 16 << 20
            archive.addfile(info, io.BytesIO(bytes(info.size)))
    shard = tmp_path / "bomb.tar.gz"
    shard.write_bytes(gzip.compress(raw.getvalue(), 1))
    assert shard.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        sizes = []
        for sample in read_tar(str(shard)):
            sizes.append(len(sample["bin"]))
            del sample
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes == [16 << 20] * 6 and peak < 64 << 20, peak / 2 ** 20
    monkeypatch.setattr(tar_module, "MAX_DECOMPRESSED", 40 << 20)
    samples = list(read_tar(str(shard)))
    assert len(samples) == 3 and "decompresses to over" in samples[-1].reason and isinstance(samples[-1], Skip)


@pytest.mark.parametrize("name", ["config.json", "open_clip_config.json"])
def test_a_config_nested_100000_deep_is_a_one_line_error(tmp_path, capsys, name):
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / name.replace("config.json", "model.safetensors")).write_bytes(b"")
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nested too deeply" in err and name in err
