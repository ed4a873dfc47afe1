"""Training and evaluation pipelines over shards: splitting, equal batch counts, bad samples."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import clipper
from clipper.data.pipeline import ShardDataset, SkipLog, make_loader
from clipper.data.reader import list_shards
from clipper.data.samples import Sample
from clipper.data.shards import write_shards

CFG = clipper.preset("fmnist-tiny")  # 28 px, 1 channel, context 16


def _samples(n, start=0, mode="L"):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        shape = (28, 28) if mode == "L" else (28, 28, 3)
        yield Sample(key=f"s{i:04d}", image=rng.integers(0, 256, shape).astype(np.uint8), text=f"item number {i}")


def _make_shards(tmp_path, sizes, name="shards"):
    out = tmp_path / name
    items, start = [], 0
    for size in sizes:
        items.extend(_samples(size, start))
        start += size
    # one call per shard layout: write_shards cuts at samples_per_shard, so build shards one by one
    written = write_shards(items, out, samples_per_shard=max(sizes)) if len(set(sizes)) == 1 else None
    if written is None:
        for i, size in enumerate(sizes):
            sub = tmp_path / f"{name}-{i}"
            write_shards(items[sum(sizes[:i]):sum(sizes[:i + 1])], sub, samples_per_shard=size)
            out.mkdir(exist_ok=True)
            (sub / "00000.tar").rename(out / f"{i:05d}.tar")
    return out


def _keys_by_rank(shards, world, workers, batch, **kw):
    out = []
    for rank in range(world):
        ds = ShardDataset(shards, CFG, batch_size=batch, rank=rank, world=world, **kw)
        batches = list(make_loader(ds, workers))
        assert all(len(b["key"]) == batch for b in batches)
        assert len(batches) == ds.batches_per_epoch()
        out.append([k for b in batches for k in b["key"]])
    return out


def test_two_ranks_two_workers_disjoint_complete_equal(tmp_path):
    shards = _make_shards(tmp_path, [10] * 8)
    per_rank = _keys_by_rank(shards, world=2, workers=2, batch=5)
    assert len(per_rank[0]) == len(per_rank[1]) == 40
    everything = per_rank[0] + per_rank[1]
    assert len(set(everything)) == 80 == len(everything)  # disjoint and complete


def test_uneven_shards_still_give_equal_batch_counts(tmp_path):
    shards = _make_shards(tmp_path, [3, 17, 9, 11])
    per_rank = _keys_by_rank(shards, world=2, workers=2, batch=4)
    # 40 samples / (2 ranks x 2 workers x batch 4) = 2 batches per worker, 4 per rank
    assert len(per_rank[0]) == len(per_rank[1]) == 16
    # the reader holding the 3-sample shard cycles it, but never reads another reader's shard
    assert not set(per_rank[0]) & set(per_rank[1])


def test_small_sets_stretch_the_epoch_over_several_passes(tmp_path):
    shards = _make_shards(tmp_path, [10] * 4)
    ds = ShardDataset(shards, CFG, batch_size=5, rank=0, world=1, min_epoch_batches=20)
    keys = [k for b in make_loader(ds, 2) for k in b["key"]]
    assert ds.batches_per_epoch() == 20 and len(keys) == 100
    # every sample comes round 2.5 times, none a third time before all came twice
    counts = {k: keys.count(k) for k in set(keys)}
    assert len(counts) == 40 and set(counts.values()) <= {2, 3}


def test_resampled_stream_has_fixed_epoch_length(tmp_path):
    shards = _make_shards(tmp_path, [10] * 4)
    per_rank = _keys_by_rank(shards, world=2, workers=1, batch=5, resampled=True)
    assert len(per_rank[0]) == len(per_rank[1]) == 20


def test_epochs_reshuffle_deterministically(tmp_path):
    shards = _make_shards(tmp_path, [10] * 4)

    def keys(epoch, seed=0):
        ds = ShardDataset(shards, CFG, batch_size=10, seed=seed, rank=0, world=1)
        ds.set_epoch(epoch)
        return [k for b in make_loader(ds, 0) for k in b["key"]]

    assert keys(0) == keys(0) and keys(0) != keys(1) and keys(0) != keys(0, seed=1)
    assert sorted(keys(0)) == sorted(keys(1))


def test_eval_visits_every_sample_once_in_order(tmp_path):
    shards = _make_shards(tmp_path, [10, 10, 7], name="ev")
    ds = ShardDataset(shards, CFG, batch_size=4, train=False, rank=0, world=1)
    keys = [k for b in make_loader(ds, 0) for k in b["key"]]
    assert keys == [f"s{i:04d}" for i in range(27)] and ds.batches_per_epoch() == 7
    keys2 = [k for b in make_loader(ds, 2) for k in b["key"]]
    assert sorted(keys2) == keys


def test_batches_hold_model_inputs(tmp_path):
    shards = _make_shards(tmp_path, [8])
    batch = next(iter(make_loader(ShardDataset(shards, CFG, batch_size=4, rank=0, world=1), 0)))
    assert batch["image"].shape == (4, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == torch.long
    tok = clipper.Tokenizer(16)
    assert tok.decode(batch["text"][0]).startswith("item number")
    rgb = clipper.preset("fmnist-tiny")
    rgb.vision.in_channels, rgb.vision.image_mean, rgb.vision.image_std = 3, (0.5,) * 3, (0.5,) * 3
    batch = next(iter(make_loader(ShardDataset(shards, rgb, batch_size=4, train=False, rank=0, world=1), 0)))
    assert batch["image"].shape == (4, 3, 28, 28)  # grayscale images feed a 3-channel model
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(size=(28, 28)):
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    with tarfile.open(out / "00000.tar", "w") as tar:
        for i in range(6):
            _add(tar, f"good{i}.png", _png())
            _add(tar, f"good{i}.txt", b"fine caption")
        _add(tar, "notimage.png", b"GIF89a garbage")
        _add(tar, "notimage.txt", b"caption")
        _add(tar, "empty.png", _png())
        _add(tar, "empty.txt", b"  ")
        _add(tar, "latin.png", _png())
        _add(tar, "latin.txt", "caf\xe9".encode("latin-1"))
        _add(tar, "huge.png", _png((300, 300)))
        _add(tar, "huge.txt", b"big")
        _add(tar, "nocap.png", _png())
    with tarfile.open(out / "00001.tar", "w") as tar:
        for i in range(4):
            _add(tar, f"later{i}.png", _png())
            _add(tar, f"later{i}.txt", b"fine caption")
    data = (out / "00001.tar").read_bytes()
    (out / "00001.tar").write_bytes(data[:512 * 9 + 100])  # cut inside the 4th sample's image

    ds = ShardDataset(out, CFG, batch_size=3, train=False, rank=0, world=1, max_pixels=100 * 100)
    log = SkipLog()
    keys = []
    for batch in make_loader(ds, 0):
        log.add(batch)
        keys.extend(batch["key"])
    assert keys == [f"good{i}" for i in range(6)] + ["later0", "later1"]
    reasons = {s.key: s.reason for s in log.skipped}
    assert "not a readable image" in reasons["notimage"] and reasons["empty"] == "empty caption"
    assert reasons["latin"] == "caption is not UTF-8" and "pixel limit" in reasons["huge"]
    assert reasons["nocap"] == "no txt member" and "damaged tar" in reasons["later2"]
    summary = log.summary()
    assert summary.startswith("6 sample(s) skipped") and "00000.tar:notimage" in summary

    # training over the same shards completes its epochs too, and with decoded images kept in
    # memory a bad sample is skipped (and counted) again on every pass, never cached
    train = ShardDataset(out, CFG, batch_size=2, rank=0, world=1, max_pixels=100 * 100, cache_mb=1)
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = list(make_loader(train, 0))
        assert len(batches) == train.batches_per_epoch()
        assert sum(len(b["skipped"]) for b in batches) >= 5
    assert len(train.decoder.cache.images) == 6 + 2  # the good images of both shards


def test_decoded_cache_changes_nothing_but_speed(tmp_path):
    shards = _make_shards(tmp_path, [10] * 3)

    def run(cache_mb):
        ds = ShardDataset(shards, CFG, batch_size=5, rank=0, world=1, min_epoch_batches=15, cache_mb=cache_mb)
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out += list(make_loader(ds, 0))
        return ds, out

    _, plain = run(0)
    cached, batches = run(1)
    assert [b["key"] for b in batches] == [b["key"] for b in plain]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, plain))
    assert len(cached.decoder.cache.images) == 30
    # a budget of 4 images of 28 x 28 keeps 4; the others are decoded each time
    small, _ = run(4 * 28 * 28 / 2**20)
    assert len(small.decoder.cache.images) == 4 and small.decoder.cache.used == 4 * 28 * 28


def test_missing_or_empty_shard_lists_fail_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/00000.tar: no such shard"):
        list_shards(str(tmp_path / "nowhere/{00000..00001}.tar"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="holds no .tar shards"):
        ShardDataset(tmp_path / "emptydir", CFG, batch_size=2)
    with pytest.raises(ValueError, match="no shards"):
        list_shards([])
    with pytest.raises(ValueError, match="not a shard spec"):  # a name the file system refuses: one line
        list_shards("x" * 5000)


def test_too_few_shards_for_the_readers(tmp_path):
    shards = _make_shards(tmp_path, [10])
    ds = ShardDataset(shards, CFG, batch_size=2, rank=1, world=2)
    with pytest.raises(ValueError, match="cannot feed 2 rank"):
        list(make_loader(ds, 0))


def test_keywords_replace_captions_only_in_training(tmp_path):
    items = [Sample(key=f"k{i}", image=np.full((28, 28), i * 20, np.uint8), text=f"name {i}",
                    meta={"keywords": ["alpha", f"beta{i}"]}) for i in range(8)]
    write_shards(items, tmp_path / "kw", samples_per_shard=8)
    train = ShardDataset(tmp_path / "kw", CFG, batch_size=8, rank=0, world=1, keywords_prob=1.0)
    batch = next(iter(make_loader(train, 0)))
    assert batch["caption"] == [f"alpha | beta{k[1:]}" for k in batch["key"]]
    single = ShardDataset(tmp_path / "kw", CFG, batch_size=8, rank=0, world=1, keywords_prob=1.0, keyword_single=1.0)
    batch = next(iter(make_loader(single, 0)))
    assert all(c in ("alpha", f"beta{k[1:]}") for k, c in zip(batch["key"], batch["caption"]))
    assert len(set(batch["caption"])) > 2  # one keyword each, drawn at random
    evaluation = ShardDataset(tmp_path / "kw", CFG, batch_size=8, train=False, rank=0, world=1, keywords_prob=1.0)
    assert next(iter(make_loader(evaluation, 0)))["caption"] == [f"name {i}" for i in range(8)]


def _archive(path, fmt=tarfile.USTAR_FORMAT, mode="w"):
    names = ["a.png", "deep/folder/b.txt", "x" * 90 + "/" + "y" * 60 + ".json"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["z" * 150 + ".txt", "caf\u00e9.txt"]  # long and non-ASCII names: pax / GNU headers
    with tarfile.open(path, mode, format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("deep"))  # zero-size entries are files too
        info = tarfile.TarInfo("deep/folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i, name in enumerate(names):
            _add(tar, name, bytes(j % 251 for j in range(i, i + 700)) * (i + 1))
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt,mode", [(tarfile.USTAR_FORMAT, "w"), (tarfile.PAX_FORMAT, "w"),
                                      (tarfile.GNU_FORMAT, "w"), (tarfile.USTAR_FORMAT, "w:gz")])
def test_tar_reader_equals_tarfile(tmp_path, fmt, mode):
    from clipper.data.tar import tar_members

    path = tmp_path / "a.tar"
    expected = _archive(path, fmt, mode)
    assert list(tar_members(str(path))) == expected


def test_tar_reader_names_the_damage(tmp_path):
    from clipper.data.tar import TarDamage, tar_members

    path = tmp_path / "a.tar"
    members = _archive(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:512 * 6 + 100])  # inside the third file's data (headers: 0, 512, 1024, 2560)
    read = []
    with pytest.raises(TarDamage, match="unexpected end of data") as err:
        for m in tar_members(str(cut)):
            read.append(m)
    assert read == members[:2] and err.value.member == members[2][0]
    bad = bytearray(data)
    bad[1024 + 10] ^= 0xFF  # the second file's header checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(TarDamage, match="bad tar header at byte 1024"):
        list(tar_members(str(tmp_path / "bad.tar")))
    for name, content in (("empty.tar", b""), ("text.tar", b"not a tar archive at all" * 40)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TarDamage):
            list(tar_members(str(tmp_path / name)))
