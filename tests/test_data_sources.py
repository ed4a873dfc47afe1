"""Sources and the shard writer: folders, CSV, Fashion-MNIST idx files, emoji; determinism; rejects."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipper.data import fashion_mnist
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.data.sources import csv_samples, folder_samples


def _png(color, size=(20, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color, size=(20, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    files = {
        "a.png": (_png("red"), "a red square".encode()),
        "nested/b.jpg": (_jpeg("blue"), "a blue square\n".encode()),
        "nested/deeper/c.webp": (None, "a green square".encode()),
        "corrupt.jpg": (_jpeg("red")[:40], b"truncated jpeg"),
        "text.jpg": (b"this is a text file named .jpg", b"nope"),
        "zero.png": (b"", b"empty file"),
        "nocaption.png": (_png("white"), None),
        "empty.png": (_png("black"), b"   \n"),
        "latin1.png": (_png("gray"), "caf\xe9".encode("latin-1")),
        "huge.png": (_png("yellow", (300, 300)), b"too many pixels"),
    }
    for name, (image, caption) in files.items():
        if image is None:
            Image.new("RGB", (10, 10), "green").save(root / name, format="WEBP")
        else:
            (root / name).write_bytes(image)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
    return root


def test_folder_source_keeps_good_and_names_bad(messy_folder):
    items = list(folder_samples(messy_folder, max_pixels=200 * 200))
    good = {s.meta["source_id"]: s for s in items if isinstance(s, Sample)}
    bad = {r.source_id: r.reason for r in items if not isinstance(r, Sample)}
    assert sorted(good) == ["a.png", "nested/b.jpg", "nested/deeper/c.webp"]
    assert good["nested/b.jpg"].text == "a blue square" and good["nested/b.jpg"].ext == "jpg"
    assert good["nested/deeper/c.webp"].ext == "png"  # re-encoded; JPEG and PNG pass through untouched
    assert good["a.png"].image == (messy_folder / "a.png").read_bytes()
    assert "not a readable image" in bad["corrupt.jpg"] and "corrupt.jpg" in bad["corrupt.jpg"]
    assert "not an image (unknown format)" in bad["text.jpg"] and "not an image" in bad["zero.png"]
    assert "no caption file" in bad["nocaption.png"]
    assert "empty caption" in bad["empty.png"] and "not UTF-8" in bad["latin1.png"]
    assert "exceeds the pixel limit" in bad["huge.png"]


def test_csv_source(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(_png("red"))
    (tmp_path / "img" / "y.jpg").write_bytes(_jpeg("blue"))
    (tmp_path / "pairs.tsv").write_text("path\ttext\nimg/x.png\tred thing\nimg/y.jpg\tblue thing\n"
                                        "img/missing.png\tghost\n\tno image\nimg/x.png\t\n")
    items = list(csv_samples(tmp_path / "pairs.tsv", image_column="path", caption_column="text"))
    assert [s.text for s in items if isinstance(s, Sample)] == ["red thing", "blue thing"]
    reasons = [r.reason for r in items if not isinstance(r, Sample)]
    assert "no such file" in reasons[0] and "empty image path" in reasons[1] and "empty caption" in reasons[2]
    assert reasons[1].startswith("pairs.tsv:5")
    with pytest.raises(ValueError, match="no column 'image' \\(columns: path, text\\)"):
        csv_samples(tmp_path / "pairs.tsv")


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_layout_stats_and_determinism(messy_folder, tmp_path):
    stats = write_shards(folder_samples(messy_folder, max_pixels=200 * 200), tmp_path / "s1", samples_per_shard=2)
    write_shards(folder_samples(messy_folder, max_pixels=200 * 200), tmp_path / "s2", samples_per_shard=2)
    assert stats["samples"] == 3 and stats["shards"] == 2 and stats["rejected"] == 7
    kinds = stats["rejected_by_reason"]
    assert kinds["not a readable image"] == 1 and kinds["not an image"] == 2  # truncated; text, 0 bytes
    assert json.loads((tmp_path / "s1" / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}
    assert len((tmp_path / "s1" / "rejected.jsonl").read_text().splitlines()) == 7
    for name in ["00000.tar", "00001.tar", "grid.png"]:
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes(), name
    members = _members(tmp_path / "s1" / "00000.tar")
    assert sorted(members) == ["000000000.json", "000000000.png", "000000000.txt",
                               "000000005.jpg", "000000005.json", "000000005.txt"]  # keys: sorted index, as img2dataset
    assert members["000000005.txt"] == b"a blue square"
    assert json.loads(members["000000005.json"])["source_id"] == "nested/b.jpg"
    # rewriting with bigger shards leaves no stale shard behind
    write_shards(folder_samples(messy_folder, max_pixels=200 * 200), tmp_path / "s1", samples_per_shard=10)
    assert sorted(p.name for p in (tmp_path / "s1").glob("*.tar")) == ["00000.tar"]


def test_duplicate_keys_refused(tmp_path):
    s = Sample(key="k", image=np.zeros((4, 4), np.uint8), text="x")
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([s, s], tmp_path / "out")


def _write_idx(path, array, magic_dims):
    header = bytes([0, 0, 8, magic_dims]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        img, lab = fashion_mnist.FILES[split]
        _write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)), 3)
        _write_idx(tmp_path / lab, np.arange(n) % 10, 1)
    return tmp_path


def test_fashion_mnist_from_folder(tiny_fmnist):
    train = list(fashion_mnist.samples("train", tiny_fmnist, seed=0))
    assert len(train) == 30 and train[3].meta["label"] == 3 and train[3].key == "train-00003"
    for s in train:
        assert s.text == fashion_mnist.TRAIN_TEMPLATES[s.meta["template"]].format(s.meta["class"])
    assert [s.text for s in fashion_mnist.samples("train", tiny_fmnist, seed=0)] == [s.text for s in train]
    assert [s.text for s in fashion_mnist.samples("train", tiny_fmnist, seed=1)] != [s.text for s in train]
    test = list(fashion_mnist.samples("test", tiny_fmnist))
    assert [s.text for s in test] == fashion_mnist.CLASSES


def test_fashion_mnist_bad_files(tiny_fmnist, tmp_path):
    path = tiny_fmnist / fashion_mnist.FILES["test"][1]
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.load_split("test", tiny_fmnist)
    with gzip.open(path, "wb") as f:
        f.write(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.load_split("test", tiny_fmnist)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing Fashion-MNIST file"):
        fashion_mnist.find_root(tmp_path / "empty")


def test_cli_data_folder_and_bad_paths(messy_folder, tmp_path, capsys):
    from clipper.cli import main

    assert main(["data", "folder", str(messy_folder), "--out", str(tmp_path / "shards")]) == 0
    out = capsys.readouterr().out
    assert "all: 4 pairs in 1 shard(s), 6 rejected" in out  # default pixel limit admits huge.png
    assert (tmp_path / "shards" / "grid.png").is_file()
    assert main(["data", "folder", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"clipper data: error: {tmp_path / 'nope'}: not a folder"
